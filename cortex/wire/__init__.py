"""HTTP dialects: OpenAI chat/completions, OpenAI Responses, Anthropic messages.

Pure data in, data out: request parsing into attrs values, response and
stream-event builders, and the Anthropic <-> OpenAI translation. No sockets,
no trio, no I/O, so every module is tested with plain dicts and bytes.
"""
