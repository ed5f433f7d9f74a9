"""What a job writes: the record formats (`records`), rotating shards (`shards`), reading them back
(`dataset`, and the paste-able `compact_reader`)."""
