package dev.ddbcached.client;

import java.io.EOFException;
import java.io.IOException;
import java.net.StandardProtocolFamily;
import java.net.UnixDomainSocketAddress;
import java.nio.ByteBuffer;
import java.nio.channels.SocketChannel;
import java.nio.file.Path;
import java.time.Duration;
import java.util.ArrayList;
import java.util.List;
import java.util.Optional;
import java.util.OptionalLong;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicLong;
import java.util.function.Function;

/**
 * A connection to the ddbcached daemon over its Unix socket, speaking docs/PROTOCOL.md.
 *
 * <p>One connection is shared by any number of threads and pipelined: each call writes its
 * request at once and returns a future; a single reader thread reads the replies, in whatever
 * order the daemon sends them, and completes each future by the request's id (the shape of
 * Lettuce's connections). A streamed result ({@link ItemStream}) is fed by the reader without
 * ever blocking it, so a slow consumer of one scan holds up no other request. A caller whose
 * socket buffer is full waits in its write: back-pressure, not an unbounded queue.
 *
 * <p>Errors: a daemon's error response fails the future with {@link ServerException} carrying
 * the stable code; no answer within the request timeout fails it with {@link
 * RequestTimeoutException}; a connection that ends fails every request in flight with {@link
 * ConnectionClosedException}. Nothing is ever retried: a write that timed out or whose connection
 * closed may or may not have been applied, and only the caller can decide what to do.
 *
 * <p>Requests are written by the calling thread. Interrupting a thread while it is blocked in that
 * write (only possible while the socket's buffer is full) closes the connection, as the JDK does
 * for every interruptible channel, and fails every request in flight on it.
 */
public final class Client implements AutoCloseable {
  /** Longest reply frame read; the daemon's own limit is announced in the handshake. */
  private static final int MAX_REPLY_FRAME_BYTES = 64 << 20;

  /** How a client connects. */
  public record Options(String clientName, Duration requestTimeout) {
    /** Named "ddbcached-java", with a 10 s request timeout. */
    public static Options defaults() {
      return new Options("ddbcached-java", Duration.ofSeconds(10));
    }
  }

  /** What {@code health} answers. */
  public record Health(boolean ready, String detail) {}

  /** One request in flight: what its reply frames complete. Runs on the reader thread. */
  private interface Call {
    void frame(Codec.Response response);

    void fail(DdbcachedException e);
  }

  /** A call that completes a future: an error response or a failure fails it. */
  private abstract static class FutureCall<T> implements Call {
    final CompletableFuture<T> future = new CompletableFuture<>();

    /** Takes a successful frame; a {@link ProtocolException} fails the future. */
    abstract void take(Codec.Response response);

    @Override
    public final void frame(Codec.Response response) {
      if (response.isError()) {
        fail(response.error());
        return;
      }
      try {
        take(response);
      } catch (ProtocolException e) {
        fail(e);
      }
    }

    @Override
    public final void fail(DdbcachedException e) {
      future.completeExceptionally(e);
    }
  }

  private final SocketChannel channel;
  private final Object writeLock = new Object();
  private final ConcurrentHashMap<Long, Call> calls = new ConcurrentHashMap<>();
  private final AtomicLong nextId = new AtomicLong(1);
  private final Duration timeout;
  private final String server;
  private final long maxFrameBytes;
  private volatile DdbcachedException closedBy;

  private Client(SocketChannel channel, Duration timeout, String server, long maxFrameBytes) {
    this.channel = channel;
    this.timeout = timeout;
    this.server = server;
    this.maxFrameBytes = maxFrameBytes;
  }

  /** Connects with {@link Options#defaults()}. */
  public static Client connect(Path socket) throws IOException {
    return connect(socket, Options.defaults());
  }

  /** Connects to the daemon's socket and completes the version handshake. */
  public static Client connect(Path socket, Options options) throws IOException {
    SocketChannel channel = SocketChannel.open(StandardProtocolFamily.UNIX);
    try {
      channel.connect(UnixDomainSocketAddress.of(socket));
      Codec.Request hello =
          new Codec.Request("hello").integer("version", 1).str("client", options.clientName());
      writeFully(channel, Codec.encode(0, hello));
      Codec.Response r = Codec.decode(readFrame(channel));
      if (r.isError()) {
        throw r.error();
      }
      String server = r.need(r.server, "server", "hello");
      long max = r.need(r.maxFrameBytes, "max_frame_bytes", "hello");
      Client client = new Client(channel, options.requestTimeout(), server, max);
      Thread reader = new Thread(client::readReplies, "ddbcached-reader " + socket);
      reader.setDaemon(true);
      reader.start();
      return client;
    } catch (IOException | RuntimeException e) {
      channel.close();
      throw e;
    }
  }

  /** The daemon's name and version, as it announced them. */
  public String server() {
    return server;
  }

  /** The largest frame the daemon accepts. */
  public long maxFrameBytes() {
    return maxFrameBytes;
  }

  /** Whether the connection has ended; every call on it now fails at once. */
  public boolean isClosed() {
    return closedBy != null;
  }

  /** Closes the connection; requests in flight fail with {@link ConnectionClosedException}. */
  @Override
  public void close() {
    closeWith(new ConnectionClosedException("the client closed the connection", null));
  }

  // Operations, as docs/PROTOCOL.md lists them.

  public CompletableFuture<Void> ping() {
    return single(new Codec.Request("ping"), r -> null);
  }

  public CompletableFuture<Health> health() {
    return single(
        new Codec.Request("health"),
        r -> new Health(r.need(r.ready, "ready", "health"), r.detail == null ? "" : r.detail));
  }

  /** Stores version {@code ts} of a key (overwriting the same version). */
  public CompletableFuture<Void> kvPut(String ns, byte[] key, byte[] value, long ts) {
    Codec.Request r =
        new Codec.Request("kv.put").str("ns", ns).bin("key", key).bin("value", value)
            .integer("ts", ts);
    return single(r, x -> null);
  }

  /** The newest version, or the newest with timestamp {@code <= before} when it is not null. */
  public CompletableFuture<Optional<Versioned>> kvGet(String ns, byte[] key, Long before) {
    return kvGet(ns, key, before, false);
  }

  /** {@link #kvGet(String, byte[], Long)}; {@code consistent} bypasses any cache. */
  public CompletableFuture<Optional<Versioned>> kvGet(
      String ns, byte[] key, Long before, boolean consistent) {
    Codec.Request r =
        new Codec.Request("kv.get").str("ns", ns).bin("key", key).optional("before", before)
            .flag("consistent", consistent);
    return single(
        r,
        x ->
            x.need(x.found, "found", "kv.get")
                ? Optional.of(
                    new Versioned(x.need(x.ts, "ts", "kv.get"), x.need(x.value, "value", "kv.get")))
                : Optional.empty());
  }

  /** The largest timestamp of the key, if it has any version. */
  public CompletableFuture<OptionalLong> kvLatestTimestamp(String ns, byte[] key) {
    Codec.Request r = new Codec.Request("kv.latest_ts").str("ns", ns).bin("key", key);
    return single(
        r,
        x ->
            x.need(x.found, "found", "kv.latest_ts")
                ? OptionalLong.of(x.need(x.ts, "ts", "kv.latest_ts"))
                : OptionalLong.empty());
  }

  /** Every timestamp of the key, ascending. */
  public CompletableFuture<List<Long>> kvTimestamps(String ns, byte[] key) {
    return gather(new Codec.Request("kv.timestamps").str("ns", ns).bin("key", key), Long.class);
  }

  /** One {@link Entry} per key of the namespace, with its newest value. */
  public CompletableFuture<List<Entry>> kvScan(String ns) {
    return gather(scan(ns, false), Entry.class);
  }

  /** {@link #kvScan(String)}, item by item as the pieces arrive. */
  public ItemStream<Entry> kvScanStream(String ns) {
    return stream(scan(ns, false), Entry.class);
  }

  /** Every key of the namespace. */
  public CompletableFuture<List<byte[]>> kvScanKeys(String ns) {
    return gather(scan(ns, true), byte[].class);
  }

  /** {@link #kvScanKeys(String)}, key by key as the pieces arrive. */
  public ItemStream<byte[]> kvScanKeysStream(String ns) {
    return stream(scan(ns, true), byte[].class);
  }

  /**
   * Removes every version ({@code marker} null), or every version older than the newest one with
   * timestamp {@code <= marker}.
   */
  public CompletableFuture<Void> kvDelete(String ns, byte[] key, Long marker) {
    Codec.Request r =
        new Codec.Request("kv.delete").str("ns", ns).bin("key", key).optional("marker", marker);
    return single(r, x -> null);
  }

  /** Appends a value; the future holds its index (1 for a topic's first). */
  public CompletableFuture<Long> logPut(String topic, byte[] value) {
    Codec.Request r = new Codec.Request("log.put").str("topic", topic).bin("value", value);
    return single(r, x -> x.need(x.index, "index", "log.put"));
  }

  /** The last index allocated (0 for an unknown or empty topic). */
  public CompletableFuture<Long> logPosition(String topic) {
    return single(
        new Codec.Request("log.position").str("topic", topic),
        x -> x.need(x.index, "index", "log.position"));
  }

  /** The values at indices {@code from..=until}, in order. */
  public CompletableFuture<List<byte[]>> logScan(String topic, long from, long until) {
    return gather(logScanRequest(topic, from, until), byte[].class);
  }

  /** {@link #logScan(String, long, long)}, value by value as the pieces arrive. */
  public ItemStream<byte[]> logScanStream(String topic, long from, long until) {
    return stream(logScanRequest(topic, from, until), byte[].class);
  }

  /** Removes the topic; a later put starts again at 1. */
  public CompletableFuture<Void> logDelete(String topic) {
    return single(new Codec.Request("log.delete").str("topic", topic), x -> null);
  }

  private static Codec.Request scan(String ns, boolean keysOnly) {
    return new Codec.Request("kv.scan").str("ns", ns).flag("keys_only", keysOnly);
  }

  private static Codec.Request logScanRequest(String topic, long from, long until) {
    return new Codec.Request("log.scan").str("topic", topic).integer("from", from)
        .integer("until", until);
  }

  // Calls.

  /** A request answered by one frame, read by {@code read}. */
  private <T> CompletableFuture<T> single(Codec.Request request, Function<Codec.Response, T> read) {
    FutureCall<T> call =
        new FutureCall<>() {
          @Override
          void take(Codec.Response r) {
            future.complete(read.apply(r));
          }
        };
    expireAfterTimeout(send(request, call), request.op);
    return call.future;
  }

  /** A streamed request whose items are gathered into one list. */
  private <T> CompletableFuture<List<T>> gather(Codec.Request request, Class<T> kind) {
    FutureCall<List<T>> call =
        new FutureCall<>() {
          private final List<T> all = new ArrayList<>();

          @Override
          void take(Codec.Response r) {
            for (Object item : r.items == null ? List.of() : r.items) {
              if (!kind.isInstance(item)) {
                throw new ProtocolException(
                    "the " + request.op + " answer has items of the wrong kind");
              }
              all.add(kind.cast(item));
            }
            if (r.isLast()) {
              future.complete(all);
            }
          }
        };
    expireAfterTimeout(send(request, call), request.op);
    return call.future;
  }

  /** A streamed request whose items the caller takes as they come. */
  private <T> ItemStream<T> stream(Codec.Request request, Class<T> kind) {
    long[] id = new long[1];
    ItemStream<T> items = new ItemStream<>(kind, request.op, timeout, () -> calls.remove(id[0]));
    id[0] =
        send(
            request,
            new Call() {
              @Override
              public void frame(Codec.Response r) {
                if (r.isError()) {
                  items.fail(r.error());
                } else {
                  items.piece(r.items == null ? List.of() : r.items, r.isLast());
                }
              }

              @Override
              public void fail(DdbcachedException e) {
                items.fail(e);
              }
            });
    return items;
  }

  /** Registers {@code call} under a new id and writes the request; returns the id. */
  private long send(Codec.Request request, Call call) {
    long id = nextId.getAndIncrement();
    byte[] frame = Codec.encode(id, request);
    if (frame.length - 4 > maxFrameBytes) {
      // The daemon would close the connection on it, failing every other request too.
      call.fail(
          new DdbcachedException(
              request.op
                  + " request of "
                  + (frame.length - 4)
                  + " bytes exceeds the daemon's limit of "
                  + maxFrameBytes
                  + " bytes"));
      return id;
    }
    calls.put(id, call);
    // A connection that ended after the check in closeWith's sweep: fail here, or wait forever.
    DdbcachedException closed = closedBy;
    if (closed != null) {
      if (calls.remove(id) != null) {
        call.fail(closed);
      }
      return id;
    }
    try {
      synchronized (writeLock) {
        writeFully(channel, frame);
      }
    } catch (IOException e) {
      closeWith(new ConnectionClosedException("writing to the daemon failed", e));
    }
    return id;
  }

  /** Fails the call with a timeout unless it has been answered by then. */
  private void expireAfterTimeout(long id, String op) {
    CompletableFuture.delayedExecutor(timeout.toNanos(), TimeUnit.NANOSECONDS)
        .execute(
            () -> {
              Call call = calls.remove(id);
              if (call != null) {
                call.fail(new RequestTimeoutException(op, timeout));
              }
            });
  }

  /** The reader thread: replies to their calls until the connection ends. */
  private void readReplies() {
    ServerException unaddressed = null;
    DdbcachedException end;
    try {
      while (true) {
        Codec.Response r = Codec.decode(readFrame(channel));
        if (r.id == null) {
          // An error the daemon could not address to a request (an oversized frame, before
          // it closes; or a request whose id it could not read): nothing waits on it by id.
          unaddressed = r.error();
          continue;
        }
        Call call = r.isLast() ? calls.remove(r.id) : calls.get(r.id);
        if (call != null) {
          call.frame(r);
        }
      }
    } catch (EOFException e) {
      end = new ConnectionClosedException("the daemon closed the connection", unaddressed);
    } catch (IOException e) {
      end = new ConnectionClosedException("reading from the daemon failed", e);
    } catch (ProtocolException e) {
      end = e;
    }
    closeWith(end);
  }

  private void closeWith(DdbcachedException why) {
    synchronized (this) {
      if (closedBy != null) {
        return;
      }
      closedBy = why;
    }
    try {
      channel.close();
    } catch (IOException ignored) {
      // Closing is all that is left to do; there is nobody to tell.
    }
    for (Long id : calls.keySet()) {
      Call call = calls.remove(id);
      if (call != null) {
        call.fail(why);
      }
    }
  }

  private static void writeFully(SocketChannel channel, byte[] frame) throws IOException {
    ByteBuffer buf = ByteBuffer.wrap(frame);
    while (buf.hasRemaining()) {
      channel.write(buf);
    }
  }

  private static byte[] readFrame(SocketChannel channel) throws IOException {
    ByteBuffer len = ByteBuffer.allocate(4);
    readFully(channel, len);
    int n = len.flip().getInt();
    if (n < 0 || n > MAX_REPLY_FRAME_BYTES) {
      throw new ProtocolException("a reply frame announces " + Integer.toUnsignedString(n) + " bytes");
    }
    ByteBuffer body = ByteBuffer.allocate(n);
    readFully(channel, body);
    return body.array();
  }

  private static void readFully(SocketChannel channel, ByteBuffer buf) throws IOException {
    while (buf.hasRemaining()) {
      if (channel.read(buf) < 0) {
        throw new EOFException();
      }
    }
  }
}
