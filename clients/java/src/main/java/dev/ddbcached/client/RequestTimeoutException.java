package dev.ddbcached.client;

import java.time.Duration;

/**
 * No answer came within the client's request timeout. The request was sent: a write may or may
 * not have been applied, and it is not retried. A late answer is discarded.
 */
public final class RequestTimeoutException extends DdbcachedException {
  private static final long serialVersionUID = 1L;

  RequestTimeoutException(String op, Duration timeout) {
    super(op + " got no answer within " + timeout.toMillis() + " ms (a write may have been applied)");
  }
}
