# gcp make targets (filled in by the bootstrap work)
