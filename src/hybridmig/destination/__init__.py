"""The destination side: serve's sessions, the lazy-pages daemon and its
page sources, and the guard of a restored copy."""
