"""Getting an item's bytes: URL lists and folders read (`sources`), addresses refused
(`addresses`), the guarded HTTP download (`fetch`)."""
