"""Task suites: each yields Samples; see tasks/base.py."""
