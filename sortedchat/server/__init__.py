"""`sortedchat serve`: the OpenAI chat API over HTTP, where every request chooses its depth.

`app` routes the requests (starlette), `requests` turns a body into the engine's prompt, `Mode` and sampling,
`scheduler` runs every request's generation on one engine thread (round robin, token by token), `batching` runs
the fixed-depth steps of concurrent requests as one batch, `sessions` keeps the conversations whose prompt K/V a
later request can reuse, `replies` writes the OpenAI objects, and `running` starts uvicorn in the foreground or
on a background thread.
"""
