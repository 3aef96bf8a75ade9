"""The experiments whose results the chapters show and assert: one module per chapter."""
