package dev.ddbcached.client;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertInstanceOf;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.io.IOException;
import java.net.StandardProtocolFamily;
import java.net.UnixDomainSocketAddress;
import java.nio.ByteBuffer;
import java.nio.channels.ServerSocketChannel;
import java.nio.channels.SocketChannel;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicInteger;
import org.junit.jupiter.api.Test;
import org.msgpack.core.MessageBufferPacker;
import org.msgpack.core.MessagePack;

/**
 * What a real daemon cannot be made to do on demand, from a scripted server on a Unix socket:
 * never answering, closing mid-request, an error addressed to no request.
 */
class FaultTest {
  /** After the handshake, what the scripted server does with each request frame. */
  private interface Script {
    /** Returns false to close the connection. */
    boolean onRequest(SocketChannel channel) throws IOException;
  }

  /** A server that answers {@code hello}, then follows its script; counts the requests read. */
  private static final class ScriptedServer implements AutoCloseable {
    final Path socket;
    final AtomicInteger requests = new AtomicInteger();
    private final ServerSocketChannel server;

    ScriptedServer(Script script) throws IOException {
      socket = Files.createTempDirectory("ddbcached-fake").resolve("fake.sock");
      server = ServerSocketChannel.open(StandardProtocolFamily.UNIX);
      server.bind(UnixDomainSocketAddress.of(socket));
      Thread t =
          new Thread(
              () -> {
                try (SocketChannel c = server.accept()) {
                  read(c);
                  write(c, map("id", 0L, "code", 0L, "version", 1L, "server", "fake", "max_frame_bytes", 1L << 20));
                  while (true) {
                    read(c);
                    requests.incrementAndGet();
                    if (!script.onRequest(c)) {
                      return;
                    }
                  }
                } catch (IOException e) {
                  // The client went away: the script is over.
                }
              });
      t.setDaemon(true);
      t.start();
    }

    @Override
    public void close() throws IOException {
      server.close();
      Files.deleteIfExists(socket);
    }
  }

  private static void read(SocketChannel c) throws IOException {
    ByteBuffer len = ByteBuffer.allocate(4);
    while (len.hasRemaining()) {
      if (c.read(len) < 0) {
        throw new IOException("closed");
      }
    }
    ByteBuffer body = ByteBuffer.allocate(len.flip().getInt());
    while (body.hasRemaining()) {
      if (c.read(body) < 0) {
        throw new IOException("closed");
      }
    }
  }

  private static void write(SocketChannel c, byte[] body) throws IOException {
    ByteBuffer frame = ByteBuffer.allocate(4 + body.length).putInt(body.length).put(body).flip();
    while (frame.hasRemaining()) {
      c.write(frame);
    }
  }

  /** A map of alternating names and values (Long, String, or null for nil). */
  private static byte[] map(Object... kv) throws IOException {
    try (MessageBufferPacker p = MessagePack.newDefaultBufferPacker()) {
      p.packMapHeader(kv.length / 2);
      for (int i = 0; i < kv.length; i += 2) {
        p.packString((String) kv[i]);
        Object v = kv[i + 1];
        if (v == null) {
          p.packNil();
        } else if (v instanceof Long n) {
          p.packLong(n);
        } else {
          p.packString((String) v);
        }
      }
      return p.toByteArray();
    }
  }

  private static Throwable failure(CompletableFuture<?> f) {
    return assertThrows(ExecutionException.class, () -> f.get(30, TimeUnit.SECONDS)).getCause();
  }

  @Test
  void anUnansweredWriteTimesOutAndIsNotRetried() throws Exception {
    try (ScriptedServer server = new ScriptedServer(c -> true);
        Client client =
            Client.connect(server.socket, new Client.Options("t", Duration.ofMillis(300)))) {
      long started = System.nanoTime();
      Throwable e = failure(client.kvPut("ns", new byte[] {1}, new byte[] {2}, 1));
      assertInstanceOf(RequestTimeoutException.class, e);
      long waited = TimeUnit.NANOSECONDS.toMillis(System.nanoTime() - started);
      assertTrue(waited >= 300 && waited < 5000, waited + " ms");
      // Well past the timeout, the server has still seen the write once.
      Thread.sleep(600);
      assertEquals(1, server.requests.get());
      assertTrue(!client.isClosed(), "a timeout does not end the connection");
    }
  }

  @Test
  void aConnectionThatEndsFailsRequestsInFlightAndLaterOnes() throws Exception {
    try (ScriptedServer server = new ScriptedServer(c -> false);
        Client client = Client.connect(server.socket)) {
      assertInstanceOf(ConnectionClosedException.class, failure(client.logPut("t", new byte[] {1})));
      TestDaemon.waitFor("the client to see the end", Duration.ofSeconds(10), client::isClosed);
      assertInstanceOf(ConnectionClosedException.class, failure(client.ping()));
    }
  }

  @Test
  void anErrorAddressedToNoRequestExplainsTheClose() throws Exception {
    Script tooLarge =
        c -> {
          write(c, map("id", null, "code", 4L, "message", "frame exceeds this server's limit"));
          return false;
        };
    try (ScriptedServer server = new ScriptedServer(tooLarge);
        Client client = Client.connect(server.socket)) {
      Throwable e = failure(client.ping());
      assertInstanceOf(ConnectionClosedException.class, e);
      ServerException cause = assertInstanceOf(ServerException.class, e.getCause());
      assertEquals(ErrorCode.FRAME_TOO_LARGE, cause.errorCode());
    }
  }
}
