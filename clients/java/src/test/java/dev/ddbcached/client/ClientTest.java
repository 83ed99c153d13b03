package dev.ddbcached.client;

import static java.nio.charset.StandardCharsets.UTF_8;
import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertInstanceOf;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.util.ArrayList;
import java.util.HashSet;
import java.util.List;
import java.util.Optional;
import java.util.OptionalLong;
import java.util.Set;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.TimeUnit;
import org.junit.jupiter.api.AfterAll;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;

/** Every operation of docs/PROTOCOL.md through the client, against a real daemon. */
class ClientTest {
  private static Client client;

  @BeforeAll
  static void connect() throws Exception {
    client = TestDaemon.get().client();
  }

  @AfterAll
  static void disconnect() {
    client.close();
  }

  private static byte[] b(String s) {
    return s.getBytes(UTF_8);
  }

  private static <T> T get(CompletableFuture<T> f) throws Exception {
    return f.get(30, TimeUnit.SECONDS);
  }

  /** The exception a failed future failed with. */
  private static Throwable failure(CompletableFuture<?> f) {
    ExecutionException e = assertThrows(ExecutionException.class, () -> f.get(30, TimeUnit.SECONDS));
    return e.getCause();
  }

  @Test
  void handshakeHealthAndPing() throws Exception {
    assertTrue(client.server().startsWith("ddbcached "), client.server());
    assertTrue(client.maxFrameBytes() >= 512 * 1024);
    get(client.ping());
    Client.Health health = get(client.health());
    assertTrue(health.ready(), health.detail());
  }

  @Test
  void keyValueVersionsFollowTheContract() throws Exception {
    String ns = TestDaemon.name();
    byte[] key = {0, (byte) 0xff, 'k'};
    for (long ts : new long[] {1, 2, 5}) {
      get(client.kvPut(ns, key, b("v" + ts), ts));
    }
    assertEquals("v5", new String(get(client.kvGet(ns, key, null)).orElseThrow().value(), UTF_8));
    Versioned at2 = get(client.kvGet(ns, key, 2L)).orElseThrow();
    assertEquals(2, at2.timestamp());
    assertArrayEquals(b("v2"), at2.value());
    assertEquals(Optional.empty(), get(client.kvGet(ns, key, 0L)));
    assertEquals(OptionalLong.of(5), get(client.kvLatestTimestamp(ns, key)));
    assertEquals(List.of(1L, 2L, 5L), get(client.kvTimestamps(ns, key)));
    assertTrue(get(client.kvGet(ns, key, 5L, true)).isPresent(), "a consistent read");

    // Keeps the newest version <= 3 and everything newer.
    get(client.kvDelete(ns, key, 3L));
    assertEquals(List.of(2L, 5L), get(client.kvTimestamps(ns, key)));
    assertArrayEquals(b("v2"), get(client.kvGet(ns, key, 3L)).orElseThrow().value());
    get(client.kvDelete(ns, key, null));
    assertEquals(Optional.empty(), get(client.kvGet(ns, key, null)));
    assertEquals(OptionalLong.empty(), get(client.kvLatestTimestamp(ns, key)));
    assertEquals(List.of(), get(client.kvTimestamps(ns, key)));

    // An empty value is a value.
    get(client.kvPut(ns, key, new byte[0], 7));
    assertArrayEquals(new byte[0], get(client.kvGet(ns, key, null)).orElseThrow().value());
  }

  @Test
  void scansReturnTheNewestValueOfEveryKey() throws Exception {
    String ns = TestDaemon.name();
    List<CompletableFuture<Void>> puts = new ArrayList<>();
    for (int i = 0; i < 1001; i++) {
      puts.add(client.kvPut(ns, b("abc_" + i), b("xyz_" + i), 1));
    }
    puts.add(client.kvPut(ns, b("abc_0"), b("newer"), 2));
    CompletableFuture.allOf(puts.toArray(CompletableFuture[]::new)).get(60, TimeUnit.SECONDS);

    List<Entry> entries = get(client.kvScan(ns));
    assertEquals(1001, entries.size());
    Set<String> pairs = new HashSet<>();
    for (Entry e : entries) {
      pairs.add(new String(e.key(), UTF_8) + "=" + new String(e.value(), UTF_8));
    }
    assertTrue(pairs.contains("abc_0=newer") && pairs.contains("abc_1000=xyz_1000"));
    assertEquals(1001, new HashSet<>(TestDaemon.strings(get(client.kvScanKeys(ns)))).size());
    int streamed = 0;
    try (ItemStream<byte[]> keys = client.kvScanKeysStream(ns)) {
      while (keys.hasNext()) {
        keys.next();
        streamed++;
      }
    }
    assertEquals(1001, streamed);
    assertEquals(List.of(), get(client.kvScan(TestDaemon.name())));
  }

  @Test
  void logsAllocateIndicesAndScanRanges() throws Exception {
    String topic = TestDaemon.name();
    assertEquals(0L, get(client.logPosition(topic)));
    assertEquals(List.of(), get(client.logScan(topic, 1, 10)));
    for (long i = 1; i <= 768; i++) {
      assertEquals(i, get(client.logPut(topic, b("" + (i - 1)))));
    }
    assertEquals(768L, get(client.logPosition(topic)));
    List<String> tail = TestDaemon.strings(get(client.logScan(topic, 4, Long.MAX_VALUE)));
    assertEquals(765, tail.size());
    assertEquals("3", tail.get(0));
    assertEquals("767", tail.get(764));
    get(client.logDelete(topic));
    assertEquals(0L, get(client.logPosition(topic)));
    assertEquals(1L, get(client.logPut(topic, b("again"))));
  }

  @Test
  void oneConnectionServesManyThreadsPipelined() throws Exception {
    String ns = TestDaemon.name();
    String topic = TestDaemon.name();
    ExecutorService pool = Executors.newFixedThreadPool(8);
    try {
      List<Future<Set<Long>>> workers = new ArrayList<>();
      for (int t = 0; t < 8; t++) {
        int worker = t;
        workers.add(
            pool.submit(
                () -> {
                  Set<Long> indices = new HashSet<>();
                  for (int i = 0; i < 50; i++) {
                    byte[] key = b(worker + "/" + i);
                    client.kvPut(ns, key, key, i).get(30, TimeUnit.SECONDS);
                    byte[] read = client.kvGet(ns, key, null).get(30, TimeUnit.SECONDS).orElseThrow().value();
                    assertArrayEquals(key, read);
                    indices.add(client.logPut(topic, key).get(30, TimeUnit.SECONDS));
                  }
                  return indices;
                }));
      }
      Set<Long> all = new HashSet<>();
      for (Future<Set<Long>> w : workers) {
        all.addAll(w.get(120, TimeUnit.SECONDS));
      }
      // Every index handed out exactly once, none skipped.
      assertEquals(400, all.size());
      assertEquals(400L, get(client.logPosition(topic)));
    } finally {
      pool.shutdownNow();
    }
  }

  @Test
  void aSlowScanConsumerHoldsUpNoOtherRequest() throws Exception {
    String topic = TestDaemon.name();
    byte[] big = new byte[200_000];
    for (int i = 1; i <= 40; i++) {
      get(client.logPut(topic, big));
    }
    // 8 MB of values: many frames, all read while nobody takes them from the stream.
    try (ItemStream<byte[]> values = client.logScanStream(topic, 1, Long.MAX_VALUE)) {
      assertTrue(values.hasNext());
      values.next();
      for (int i = 0; i < 20; i++) {
        get(client.ping());
        assertEquals(40L, get(client.logPosition(topic)));
      }
      int rest = 0;
      while (values.hasNext()) {
        assertEquals(big.length, values.next().length);
        rest++;
      }
      assertEquals(39, rest);
    }
  }

  @Test
  void errorsCarryTheirStableCodes() throws Exception {
    Throwable empty = failure(client.kvPut("", b("k"), b("v"), 1));
    ServerException e = assertInstanceOf(ServerException.class, empty);
    assertEquals(3, e.code());
    assertEquals(ErrorCode.INVALID_ARGUMENT, e.errorCode());
    assertFalse(e.outcomeUnknown());

    Throwable large = failure(client.kvPut(TestDaemon.name(), b("k"), new byte[410_000], 1));
    assertEquals(ErrorCode.VALUE_TOO_LARGE, assertInstanceOf(ServerException.class, large).errorCode());

    ServerException unknown = new ServerException(99, "from a newer daemon");
    assertEquals(null, unknown.errorCode());
    assertTrue(unknown.getMessage().contains("99"));
    // The connection is still usable after errors.
    get(client.ping());
  }
}
