"""The guide's claims, measured: one small controlled experiment per number in it (`llmkit lab`)."""
