-- wrk script: POST a chat asking for 2 answers of at most 16 tokens (the fake engine writes them: the server's own
-- work per request is measured, not generation).
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"messages": [{"role": "user", "content": "Write a haiku about rain."}], "n": 2, "max_tokens": 16}'
wrk.path = "/v1/chat/completions"
