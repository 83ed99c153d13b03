package dev.ddbcached.client;

/** The daemon sent something this client cannot read; the connection is closed. */
public final class ProtocolException extends DdbcachedException {
  private static final long serialVersionUID = 1L;

  ProtocolException(String message) {
    super(message);
  }

  ProtocolException(String message, Throwable cause) {
    super(message, cause);
  }
}
