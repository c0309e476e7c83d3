"""`python -m apigw_operator`: the `apigw-operator` command."""

from apigw_operator import main

main()
