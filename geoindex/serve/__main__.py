"""`python -m geoindex.serve` runs the same command as `geoindex serve`."""
from .cli import serve

if __name__ == "__main__":
    serve(prog_name="geoindex serve")
