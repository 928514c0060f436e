"""The agent runner: what runs inside a session's sandbox.

It polls `inbound.db`, turns each batch of messages into one prompt, drives a provider
(a model behind a small interface), and writes the answers to `outbound.db`. Those two
files and the session folder are its only link to the host; it never imports `nanoclaw`.
"""
