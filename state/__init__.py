"""Everything Redis: the keys, the scripts, the stored record formats, and the stores that read and
write them. The dataflow and the API reach Redis only through this package (ARCHITECTURE)."""
