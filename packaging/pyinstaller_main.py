"""The script PyInstaller freezes into dist/mailfence (see mailfence.spec).

A file of its own rather than mailfence/__main__.py, because PyInstaller puts the script's
folder on the module path, and mailfence/'s modules must not become top-level ones.
"""

from mailfence.cli import main

if __name__ == "__main__":
    main()
