"""One module per claim; each defines `CLAIM` (a `llmkit.lab.claim.Claim`). Discovered by `llmkit.lab.catalog`."""
