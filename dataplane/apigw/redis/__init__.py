"""Redis as the gateway uses it: a lean pool of RESP connections (`link`, a library that knows
nothing of the config) and the per-tick batch of checks in one Lua script call (`batch`)."""
