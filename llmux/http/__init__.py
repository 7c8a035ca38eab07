"""The edge: the ASGI app, its route table, body reading, auth, the proxy and llmux's own accept
loop. It asks the runtime for a grant and forwards; it decides nothing about what is awake."""
