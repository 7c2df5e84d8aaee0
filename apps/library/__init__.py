"""The photo library: an SQLite index of a person's photos (db.py), kept up to date by `index.py` from what
`scan.py` finds, searched by text, image or photo (search.py), with duplicate groups (duplicates.py)."""
