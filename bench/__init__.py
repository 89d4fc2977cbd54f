"""guardalign benchmarks: ``python -m bench`` runs them all and rewrites bench/RESULTS.md."""
