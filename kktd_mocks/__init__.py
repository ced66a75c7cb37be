"""Development tools of kktd: mocks of the services it talks to, written from their specifications.

A mock here imports nothing from kktd: it must catch what kktd gets wrong, not share kktd's mistakes.
"""
