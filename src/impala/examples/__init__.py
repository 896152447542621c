"""Examples of extending impala, importable by every process (and by the tests):
`custom_net` (your own network for vector observations), `dict_encoder` (an encoder per part of a
`Dict` observation) and `envs` (an environment factory with keyword arguments)."""
