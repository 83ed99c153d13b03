package dev.ddbcached.client;

/**
 * The connection ended (the daemon closed it, it failed, or {@link Client#close()} was called)
 * before the request was answered. A write sent before that may or may not have been applied.
 */
public final class ConnectionClosedException extends DdbcachedException {
  private static final long serialVersionUID = 1L;

  ConnectionClosedException(String message, Throwable cause) {
    super(message, cause);
  }
}
