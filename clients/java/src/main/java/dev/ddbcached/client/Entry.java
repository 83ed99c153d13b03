package dev.ddbcached.client;

/** A key of a namespace with the value of its newest version, as {@code kv.scan} returns it. */
public record Entry(byte[] key, byte[] value) {}
