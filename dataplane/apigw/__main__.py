import sys

from apigw.cli import main

sys.exit(main())
