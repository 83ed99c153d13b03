package dev.ddbcached.client;

/** Something went wrong talking to the daemon; the subclasses say what. */
public class DdbcachedException extends RuntimeException {
  private static final long serialVersionUID = 1L;

  DdbcachedException(String message) {
    super(message);
  }

  DdbcachedException(String message, Throwable cause) {
    super(message, cause);
  }
}
