"""Scan/answer records → statistics → HTML, Markdown and JSON reports."""
