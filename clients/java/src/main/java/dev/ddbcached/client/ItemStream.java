package dev.ddbcached.client;

import java.time.Duration;
import java.util.ArrayDeque;
import java.util.Iterator;
import java.util.List;
import java.util.NoSuchElementException;
import java.util.concurrent.LinkedBlockingQueue;
import java.util.concurrent.TimeUnit;

/**
 * The items of a streamed result ({@code kv.scan}, {@code log.scan}), in order, as the daemon
 * sends them piece by piece. The connection's reader only ever appends pieces here, so a consumer
 * that iterates slowly holds up no other request on the connection; the pieces it has not taken
 * yet stay in memory. {@link #next()} waits for the next piece no longer than the client's request
 * timeout. Closing the stream early discards the rest of the result.
 */
public final class ItemStream<T> implements Iterator<T>, AutoCloseable {
  /** Marks the end of the result in the queue. */
  private static final Object END = new Object();

  private final LinkedBlockingQueue<Object> pieces = new LinkedBlockingQueue<>();
  private final ArrayDeque<T> current = new ArrayDeque<>();
  private final Class<T> kind;
  private final String op;
  private final Duration timeout;
  private final Runnable abandon;
  private boolean ended;

  ItemStream(Class<T> kind, String op, Duration timeout, Runnable abandon) {
    this.kind = kind;
    this.op = op;
    this.timeout = timeout;
    this.abandon = abandon;
  }

  /** Called by the connection's reader: never blocks. */
  void piece(List<Object> items, boolean last) {
    pieces.add(items);
    if (last) {
      pieces.add(END);
    }
  }

  /** Called by the connection's reader, or on timeout or close. */
  void fail(DdbcachedException e) {
    pieces.add(e);
  }

  @Override
  public boolean hasNext() {
    while (current.isEmpty() && !ended) {
      Object next;
      try {
        next = pieces.poll(timeout.toNanos(), TimeUnit.NANOSECONDS);
      } catch (InterruptedException e) {
        Thread.currentThread().interrupt();
        throw new DdbcachedException("interrupted while waiting for " + op, e);
      }
      if (next == null) {
        close();
        throw new RequestTimeoutException(op, timeout);
      } else if (next == END) {
        ended = true;
      } else if (next instanceof DdbcachedException e) {
        ended = true;
        throw e;
      } else {
        for (Object item : (List<?>) next) {
          if (!kind.isInstance(item)) {
            close();
            throw new ProtocolException("the " + op + " answer has items of the wrong kind");
          }
          current.add(kind.cast(item));
        }
      }
    }
    return !current.isEmpty();
  }

  @Override
  public T next() {
    if (!hasNext()) {
      throw new NoSuchElementException();
    }
    return current.poll();
  }

  /** Discards whatever of the result has not been taken yet. */
  @Override
  public void close() {
    if (!ended) {
      ended = true;
      abandon.run();
    }
    pieces.clear();
    current.clear();
  }
}
