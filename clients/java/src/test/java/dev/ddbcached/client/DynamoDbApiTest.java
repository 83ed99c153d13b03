package dev.ddbcached.client;

import static java.nio.charset.StandardCharsets.UTF_8;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.time.Duration;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.concurrent.TimeUnit;
import java.util.function.Function;
import org.junit.jupiter.api.AfterAll;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.EnumSource;
import software.amazon.awssdk.auth.credentials.AwsBasicCredentials;
import software.amazon.awssdk.auth.credentials.StaticCredentialsProvider;
import software.amazon.awssdk.core.SdkBytes;
import software.amazon.awssdk.http.nio.netty.NettyNioAsyncHttpClient;
import software.amazon.awssdk.http.urlconnection.UrlConnectionHttpClient;
import software.amazon.awssdk.regions.Region;
import software.amazon.awssdk.services.dynamodb.DynamoDbAsyncClient;
import software.amazon.awssdk.services.dynamodb.DynamoDbClient;
import software.amazon.awssdk.services.dynamodb.model.AttributeValue;
import software.amazon.awssdk.services.dynamodb.model.BatchWriteItemRequest;
import software.amazon.awssdk.services.dynamodb.model.BatchWriteItemResponse;
import software.amazon.awssdk.services.dynamodb.model.ConditionalCheckFailedException;
import software.amazon.awssdk.services.dynamodb.model.DeleteRequest;
import software.amazon.awssdk.services.dynamodb.model.GetItemRequest;
import software.amazon.awssdk.services.dynamodb.model.GetItemResponse;
import software.amazon.awssdk.services.dynamodb.model.PutItemRequest;
import software.amazon.awssdk.services.dynamodb.model.PutItemResponse;
import software.amazon.awssdk.services.dynamodb.model.QueryRequest;
import software.amazon.awssdk.services.dynamodb.model.QueryResponse;
import software.amazon.awssdk.services.dynamodb.model.ScanRequest;
import software.amazon.awssdk.services.dynamodb.model.ScanResponse;
import software.amazon.awssdk.services.dynamodb.model.UpdateItemRequest;
import software.amazon.awssdk.services.dynamodb.model.UpdateItemResponse;
import software.amazon.awssdk.services.dynamodb.model.WriteRequest;

/**
 * zio-flow's own DynamoDB backend through the daemon's DynamoDB API front: exactly the
 * requests it makes (docs/DYNAMODB-API.md, from zio-flow-dynamodb 1.0.0-RC4), sent with the
 * AWS SDK for Java v2's sync client and its async client (the one zio-aws drives), each answer
 * checked against DynamoDB Local's answer to the same request made directly and consistently.
 * The reads are asked twice: the second time the front answers from memory.
 */
class DynamoDbApiTest {
  private static final String KV = TestDaemon.KV_TABLE;
  private static final String LOG = TestDaemon.LOG_TABLE;

  private static TestDaemon daemon;
  private static DynamoDbClient direct;
  private static DynamoDbClient sync;
  private static DynamoDbAsyncClient async;
  private static Client socket;

  /** The operations zio-flow's backend calls, whichever client sends them. */
  interface Calls {
    UpdateItemResponse updateItem(UpdateItemRequest r);

    QueryResponse query(QueryRequest r);

    GetItemResponse getItem(GetItemRequest r);

    PutItemResponse putItem(PutItemRequest r);

    ScanResponse scan(ScanRequest r);

    BatchWriteItemResponse batchWriteItem(BatchWriteItemRequest r);
  }

  enum Kind {
    SYNC,
    ASYNC
  }

  @BeforeAll
  static void start() throws Exception {
    daemon = TestDaemon.get();
    direct = syncClient(daemon.dynamodb);
    sync = syncClient(daemon.api);
    async =
        DynamoDbAsyncClient.builder()
            .endpointOverride(daemon.api)
            .region(Region.US_EAST_1)
            .credentialsProvider(credentials())
            .httpClientBuilder(NettyNioAsyncHttpClient.builder())
            .build();
    socket = daemon.client();
    // Both tables' freshness proven, so that reads are answered from memory.
    TestDaemon.waitFor(
        "the API's tables to be fresh",
        Duration.ofSeconds(120),
        () ->
            daemon.sample("ddbcached_api_cache_bypassing{table=\"" + KV + "\"}") == 0
                && daemon.sample("ddbcached_api_cache_bypassing{table=\"" + LOG + "\"}") == 0);
  }

  @AfterAll
  static void stop() {
    direct.close();
    sync.close();
    async.close();
    socket.close();
  }

  /**
   * The access key of the daemon's dummy credentials ({@code dynamodb.use_dummy_credentials}):
   * through the front any would do (the daemon signs with its own), but DynamoDB Local keeps a
   * database per access key, so the direct client must use the daemon's to see its tables.
   */
  private static StaticCredentialsProvider credentials() {
    return StaticCredentialsProvider.create(AwsBasicCredentials.create("ANOTREAL", "any"));
  }

  private static DynamoDbClient syncClient(java.net.URI endpoint) {
    return DynamoDbClient.builder()
        .endpointOverride(endpoint)
        .region(Region.US_EAST_1)
        .credentialsProvider(credentials())
        .httpClientBuilder(UrlConnectionHttpClient.builder())
        .build();
  }

  private static Calls calls(Kind kind) {
    if (kind == Kind.SYNC) {
      return new Calls() {
        public UpdateItemResponse updateItem(UpdateItemRequest r) {
          return sync.updateItem(r);
        }

        public QueryResponse query(QueryRequest r) {
          return sync.query(r);
        }

        public GetItemResponse getItem(GetItemRequest r) {
          return sync.getItem(r);
        }

        public PutItemResponse putItem(PutItemRequest r) {
          return sync.putItem(r);
        }

        public ScanResponse scan(ScanRequest r) {
          return sync.scan(r);
        }

        public BatchWriteItemResponse batchWriteItem(BatchWriteItemRequest r) {
          return sync.batchWriteItem(r);
        }
      };
    }
    return new Calls() {
      public UpdateItemResponse updateItem(UpdateItemRequest r) {
        return join(async.updateItem(r));
      }

      public QueryResponse query(QueryRequest r) {
        return join(async.query(r));
      }

      public GetItemResponse getItem(GetItemRequest r) {
        return join(async.getItem(r));
      }

      public PutItemResponse putItem(PutItemRequest r) {
        return join(async.putItem(r));
      }

      public ScanResponse scan(ScanRequest r) {
        return join(async.scan(r));
      }

      public BatchWriteItemResponse batchWriteItem(BatchWriteItemRequest r) {
        return join(async.batchWriteItem(r));
      }
    };
  }

  /** The async client's answer, or its failure unwrapped (as the sync client throws it). */
  private static <T> T join(java.util.concurrent.CompletableFuture<T> f) {
    try {
      return f.get(60, TimeUnit.SECONDS);
    } catch (java.util.concurrent.ExecutionException e) {
      if (e.getCause() instanceof RuntimeException r) {
        throw r;
      }
      throw new IllegalStateException(e.getCause());
    } catch (Exception e) {
      throw new IllegalStateException(e);
    }
  }

  private static AttributeValue s(String v) {
    return AttributeValue.fromS(v);
  }

  private static AttributeValue n(long v) {
    return AttributeValue.fromN(Long.toString(v));
  }

  private static AttributeValue b(byte[] v) {
    return AttributeValue.fromB(SdkBytes.fromByteArray(v));
  }

  /** zio-flow's key-value partition key: namespace bytes then key bytes. */
  private static AttributeValue kvKey(String ns, String key) {
    return b((ns + key).getBytes(UTF_8));
  }

  /** Query requests answered from memory so far. */
  private static double cachedQueries() throws Exception {
    return daemon.sample("ddbcached_api_requests_total{operation=\"Query\",outcome=\"cached\"}");
  }

  private static double cachedGets() throws Exception {
    return daemon.sample("ddbcached_api_requests_total{operation=\"GetItem\",outcome=\"cached\"}");
  }

  /**
   * Waits until every change made to {@code table} before this call has been proven
   * applied to the front's cache (its freshness proof is newer than now): each write's
   * stream record drops what it touched, so a read counted as answered from memory must
   * come after them all, whoever made them.
   */
  private static void settle(String table) throws Exception {
    long since = System.nanoTime();
    TestDaemon.waitFor(
        "the table's stream records",
        Duration.ofSeconds(120),
        () -> {
          double elapsed = (System.nanoTime() - since) / 1e9;
          return daemon.sample("ddbcached_api_cache_seconds_since_fresh{table=\"" + table + "\"}")
              < elapsed;
        });
  }

  // --- The key-value store, as zio-flow's backend calls it. ---

  private static void kvPut(Calls c, String ns, String key, long ts, String value) {
    c.updateItem(
        UpdateItemRequest.builder()
            .tableName(KV)
            .key(Map.of("zflow_kv_key", kvKey(ns, key), "zflow_kv_timestamp", n(ts)))
            .updateExpression(
                "SET zflow_kv_value = :valueColumnValue, zflow_kv_namespace = :namespaceValue")
            .expressionAttributeValues(
                Map.of(":valueColumnValue", b(value.getBytes(UTF_8)), ":namespaceValue", s(ns)))
            .build());
  }

  /** {@code getLatest}'s Query: the newest version, or the newest at or before {@code before}. */
  private static QueryRequest latest(String ns, String key, Long before, Map<String, AttributeValue> start) {
    String condition = "zflow_kv_key = :keyValue";
    Map<String, AttributeValue> values = new java.util.HashMap<>();
    values.put(":keyValue", kvKey(ns, key));
    if (before != null) {
      condition += " AND zflow_kv_timestamp <= :timestampValue";
      values.put(":timestampValue", n(before));
    }
    return QueryRequest.builder()
        .tableName(KV)
        .keyConditionExpression(condition)
        .expressionAttributeValues(values)
        .limit(1)
        .scanIndexForward(false)
        .exclusiveStartKey(start)
        .build();
  }

  /** What DynamoDB answers to {@code q} now. */
  private static QueryResponse truth(QueryRequest q) {
    return direct.query(q.toBuilder().consistentRead(true).build());
  }

  /** {@code getAllTimestamps}: the Query with Limit 1, page after page. */
  private static List<Map<String, AttributeValue>> allVersions(
      Function<QueryRequest, QueryResponse> query, String ns, String key) {
    List<Map<String, AttributeValue>> all = new ArrayList<>();
    Map<String, AttributeValue> start = null;
    do {
      QueryResponse page = query.apply(latest(ns, key, null, start));
      all.addAll(page.items());
      start = page.hasLastEvaluatedKey() ? page.lastEvaluatedKey() : null;
    } while (start != null);
    return all;
  }

  private static ScanRequest scanAll(String ns) {
    return ScanRequest.builder()
        .tableName(KV)
        .filterExpression("zflow_kv_namespace = :namespaceValue")
        .expressionAttributeValues(Map.of(":namespaceValue", s(ns)))
        .projectionExpression("zflow_kv_key, zflow_kv_value")
        .build();
  }

  @ParameterizedTest
  @EnumSource(Kind.class)
  void theKeyValueStoreReadsItsOwnWritesAndRepeatsFromMemory(Kind kind) throws Exception {
    Calls c = calls(kind);
    String ns = TestDaemon.name();
    for (long ts = 1; ts <= 3; ts++) {
      kvPut(c, ns, "k", ts, "v" + ts);
    }
    settle(KV);
    for (int round = 0; round < 2; round++) {
      double before = cachedQueries();
      for (Long at : new Long[] {null, 2L, 0L}) {
        QueryRequest q = latest(ns, "k", at, null);
        QueryResponse got = c.query(q);
        assertEquals(truth(q).items(), got.items(), "getLatest before " + at);
        assertEquals(truth(q).lastEvaluatedKey(), got.lastEvaluatedKey());
      }
      List<Map<String, AttributeValue>> versions = allVersions(c::query, ns, "k");
      assertEquals(allVersions(DynamoDbApiTest::truth, ns, "k"), versions);
      assertEquals(3, versions.size());
      // The first round filled (its versions' first page is getLatest's request again);
      // the second is answered from memory, every page of it (Limit 1: four pages).
      assertEquals(round == 0 ? 1 : 3 + 4, cachedQueries() - before, "round " + round);
    }
    // A write through the front is read back at once, though the newest was cached.
    kvPut(c, ns, "k", 4, "v4");
    QueryResponse newest = c.query(latest(ns, "k", null, null));
    assertEquals("v4", newest.items().get(0).get("zflow_kv_value").b().asUtf8String());
    // scanAll: forwarded, as DynamoDB answers it.
    assertEquals(direct.scan(scanAll(ns)).items(), c.scan(scanAll(ns)).items());
    // delete: BatchWriteItem of DeleteRequests; then nothing is left to read.
    List<WriteRequest> deletes = new ArrayList<>();
    for (Map<String, AttributeValue> v : allVersions(c::query, ns, "k")) {
      Map<String, AttributeValue> key =
          Map.of("zflow_kv_key", v.get("zflow_kv_key"), "zflow_kv_timestamp", v.get("zflow_kv_timestamp"));
      deletes.add(WriteRequest.builder().deleteRequest(DeleteRequest.builder().key(key).build()).build());
    }
    c.batchWriteItem(BatchWriteItemRequest.builder().requestItems(Map.of(KV, deletes)).build());
    assertTrue(c.query(latest(ns, "k", null, null)).items().isEmpty());
  }

  // --- The indexed store, as zio-flow's backend calls it. ---

  private static Map<String, AttributeValue> counterKey(String topic) {
    return Map.of("zflow_idx_topic", s(topic), "zflow_idx_index", n(-1));
  }

  /** {@code position}: the counter's GetItem; 0 for a new topic. */
  private static long position(Calls c, String topic) {
    GetItemResponse r = c.getItem(GetItemRequest.builder().tableName(LOG).key(counterKey(topic)).build());
    return r.hasItem() ? Long.parseLong(r.item().get("zflow_idx_value").n()) : 0;
  }

  /** {@code put}: the counter read, moved on under a condition, then the entry written. */
  private static long append(Calls c, String topic, String value) {
    while (true) {
      long index = position(c, topic) + 1;
      Map<String, AttributeValue> counter = new java.util.HashMap<>(counterKey(topic));
      counter.put("zflow_idx_value", n(index));
      try {
        c.putItem(
            PutItemRequest.builder()
                .tableName(LOG)
                .item(counter)
                .conditionExpression("zflow_idx_value = :idx OR attribute_not_exists(zflow_idx_value)")
                .expressionAttributeValues(Map.of(":idx", n(index - 1)))
                .build());
      } catch (ConditionalCheckFailedException e) {
        continue;
      }
      c.putItem(
          PutItemRequest.builder()
              .tableName(LOG)
              .item(
                  Map.of(
                      "zflow_idx_topic", s(topic),
                      "zflow_idx_index", n(index),
                      "zflow_idx_value", b(value.getBytes(UTF_8))))
              .build());
      return index;
    }
  }

  /** {@code scan}: the entries between two indices, paginated. */
  private static List<Map<String, AttributeValue>> entries(
      Function<QueryRequest, QueryResponse> query, String topic, long from, long to) {
    List<Map<String, AttributeValue>> all = new ArrayList<>();
    Map<String, AttributeValue> start = null;
    do {
      QueryResponse page =
          query.apply(
              QueryRequest.builder()
                  .tableName(LOG)
                  .keyConditionExpression(
                      "zflow_idx_topic=:topic AND (zflow_idx_index BETWEEN :fromIdx AND :toIdx)")
                  .expressionAttributeValues(
                      Map.of(":topic", s(topic), ":fromIdx", n(from), ":toIdx", n(to)))
                  .exclusiveStartKey(start)
                  .build());
      all.addAll(page.items());
      start = page.hasLastEvaluatedKey() ? page.lastEvaluatedKey() : null;
    } while (start != null);
    return all;
  }

  @ParameterizedTest
  @EnumSource(Kind.class)
  void theIndexedStoreAllocatesReadsAndDeletes(Kind kind) throws Exception {
    Calls c = calls(kind);
    String topic = TestDaemon.name();
    assertEquals(0, position(c, topic));
    for (int i = 1; i <= 3; i++) {
      assertEquals(i, append(c, topic, "e" + i));
    }
    settle(LOG);
    for (int round = 0; round < 2; round++) {
      double queries = cachedQueries();
      double gets = cachedGets();
      List<Map<String, AttributeValue>> got = entries(c::query, topic, 1, 3);
      assertEquals(entries(DynamoDbApiTest::truth, topic, 1, 3), got);
      assertEquals(3, got.size());
      assertEquals(3, position(c, topic));
      assertEquals(round, cachedQueries() - queries, "round " + round);
      assertEquals(round, cachedGets() - gets, "round " + round);
    }
    // The next append reads the counter it just cached and must see it moved on.
    assertEquals(4, append(c, topic, "e4"));
    assertEquals(4, entries(c::query, topic, 1, Long.MAX_VALUE).size());
    List<WriteRequest> deletes = new ArrayList<>();
    for (long i = -1; i <= 4; i++) {
      if (i == 0) {
        continue;
      }
      deletes.add(
          WriteRequest.builder()
              .deleteRequest(
                  DeleteRequest.builder()
                      .key(Map.of("zflow_idx_topic", s(topic), "zflow_idx_index", n(i)))
                      .build())
              .build());
    }
    c.batchWriteItem(BatchWriteItemRequest.builder().requestItems(Map.of(LOG, deletes)).build());
    assertEquals(0, position(c, topic));
    assertTrue(entries(c::query, topic, 1, Long.MAX_VALUE).isEmpty());
  }

  @ParameterizedTest
  @EnumSource(Kind.class)
  void aWriteThroughTheSocketIsSeenThroughTheApiAtOnce(Kind kind) throws Exception {
    Calls c = calls(kind);
    String topic = TestDaemon.name();
    socket.logPut(topic, "one".getBytes(UTF_8)).get(30, TimeUnit.SECONDS);
    assertEquals(1, entries(c::query, topic, 1, Long.MAX_VALUE).size());
    assertEquals(1, position(c, topic));
    // Both reads are now held in memory; the socket's append must drop them.
    long index = socket.logPut(topic, "two".getBytes(UTF_8)).get(30, TimeUnit.SECONDS);
    assertEquals(2, index);
    List<Map<String, AttributeValue>> got = entries(c::query, topic, 1, Long.MAX_VALUE);
    assertEquals(2, got.size());
    assertEquals("two", got.get(1).get("zflow_idx_value").b().asUtf8String());
    assertEquals(2, position(c, topic));
  }

  /**
   * A client with endpoint discovery on asks DescribeEndpoints and sends what follows to the
   * address it is given: the front gives its own, so the client never goes around it.
   */
  @Test
  void aClientWithEndpointDiscoveryStaysOnTheDaemon() throws Exception {
    String described = "ddbcached_api_requests_total{operation=\"describe\",outcome=\"cached\"}";
    String gets = "ddbcached_api_requests_total{operation=\"GetItem\",outcome=\"cached\"}";
    double describedBefore = daemon.sample(described);
    GetItemRequest get =
        GetItemRequest.builder()
            .tableName(KV)
            .key(Map.of("zflow_kv_key", kvKey(TestDaemon.name(), "k"), "zflow_kv_timestamp", n(1)))
            .build();
    try (DynamoDbClient discovering =
        DynamoDbClient.builder()
            .endpointOverride(daemon.api)
            .endpointDiscoveryEnabled(true)
            .region(Region.US_EAST_1)
            .credentialsProvider(credentials())
            .httpClientBuilder(UrlConnectionHttpClient.builder())
            .build()) {
      // The SDK refreshes its endpoints in the background while the first calls go on.
      TestDaemon.waitFor(
          "the client to discover its endpoint",
          Duration.ofSeconds(60),
          () -> {
            discovering.getItem(get);
            return daemon.sample(described) > describedBefore;
          });
      double getsBefore = daemon.sample(gets);
      assertFalse(discovering.getItem(get).hasItem());
      assertEquals(getsBefore + 1, daemon.sample(gets), "answered by the daemon, from memory");
    }
  }
}
