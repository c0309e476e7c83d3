"""HTTP meaning shared by every part: the normal form of request targets and hosts, and the
gateway's own errors."""
