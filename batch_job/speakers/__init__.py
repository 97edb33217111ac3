"""Speaker labels ("who said what"): a GE2E voice encoder, clustering, and labels on a transcript."""
