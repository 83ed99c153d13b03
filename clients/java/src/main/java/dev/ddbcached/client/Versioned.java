package dev.ddbcached.client;

/** One version of a key: its timestamp and its value (possibly empty). */
public record Versioned(long timestamp, byte[] value) {}
