"""The Typer skin of guardalign: flag parsing only; every command calls one library function."""
