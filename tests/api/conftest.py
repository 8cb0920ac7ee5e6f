"""API tests: the HTTP surface, with the FastAPI app in this process or one `prefixserve serve` process on
loopback (tests/server_process.py): the endpoints (TGI's, OpenAI's, the adapters'), unmodified clients,
request limits, tenants and keys, operations (drain, metrics), tracing, fuzzing against the OpenAPI schema,
and the command line's start-up.

Fixtures: none of this layer's own; tiny_model_dirs and adapter_dirs come from tests/conftest.py. Servers
are module fixtures in each test file; a test that needs a server process is marked `slow` (starting one
takes about 10 s here).
"""
