"""Benchmarks, one module each (`fedkey bench NAME`)."""
