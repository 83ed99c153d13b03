package dev.ddbcached.client;

import java.io.IOException;
import java.net.InetAddress;
import java.net.ServerSocket;
import java.net.Socket;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.time.Instant;
import java.util.List;

/**
 * A real daemon for the tests of this JVM: DynamoDB Local (installed by the repository's
 * scripts/dynamodb-local.sh) on a free loopback port, the tables, and the {@code ddbcached}
 * binary on a socket of its own, answering DynamoDB's API too (caching the stores' two
 * tables) and serving its metrics on free loopback ports. Started once, stopped when the
 * JVM exits.
 */
final class TestDaemon {
  static final Path ROOT = Path.of(System.getProperty("ddbcached.root", "../.."));
  static final Path BIN = Path.of(System.getProperty("ddbcached.bin", "../../target/debug/ddbcached"));

  private static TestDaemon instance;

  static final String KV_TABLE = "_zflow_key_value_store";
  static final String LOG_TABLE = "_zflow_indexed_store";

  final Path socket;
  /** DynamoDB Local, called directly. */
  final URI dynamodb;
  /** The daemon's DynamoDB API front. */
  final URI api;
  /** The daemon's metrics endpoint. */
  final URI metrics;

  private TestDaemon(Path socket, URI dynamodb, URI api, URI metrics) {
    this.socket = socket;
    this.dynamodb = dynamodb;
    this.api = api;
    this.metrics = metrics;
  }

  /** The daemon, started on first use. */
  static synchronized TestDaemon get() throws Exception {
    if (instance == null) {
      instance = start();
    }
    return instance;
  }

  private static TestDaemon start() throws Exception {
    Path dir = Files.createTempDirectory("ddbcached-java-test");
    int port = freePort();
    Process dynamodb =
        new ProcessBuilder(
                ROOT.toAbsolutePath().resolve("scripts/dynamodb-local.sh").toString(), "start", "" + port)
            // It writes a metadata file into its working directory.
            .directory(dir.toFile())
            .redirectErrorStream(true)
            .redirectOutput(dir.resolve("dynamodb.log").toFile())
            .start();
    Runtime.getRuntime().addShutdownHook(new Thread(dynamodb::destroy));
    waitFor("DynamoDB Local to listen", Duration.ofSeconds(60), () -> listens(port));

    Path socket = dir.resolve("ddbcached.sock");
    Path config = dir.resolve("ddbcached.toml");
    int apiPort = freePort();
    int metricsPort = freePort();
    Files.writeString(
        config,
        String.join(
            "\n",
            "[server]",
            "socket_path = \"" + socket + "\"",
            "[dynamodb]",
            "endpoint = \"http://127.0.0.1:" + port + "\"",
            "region = \"us-east-1\"",
            "use_dummy_credentials = true",
            "[dynamodb_api]",
            "listen = \"127.0.0.1:" + apiPort + "\"",
            "tables = [\"" + KV_TABLE + "\", \"" + LOG_TABLE + "\"]",
            // Tests count what the cache answers: no stream lag on a loaded machine may
            // make a read bypass it.
            "[cache]",
            "max_staleness_ms = 600000",
            "[metrics]",
            "listen = \"127.0.0.1:" + metricsPort + "\"",
            ""));
    Process init =
        new ProcessBuilder(BIN.toString(), "init-tables", "-c", config.toString())
            .redirectErrorStream(true)
            .redirectOutput(dir.resolve("init.log").toFile())
            .start();
    if (init.waitFor() != 0) {
      throw new IllegalStateException("init-tables failed: " + Files.readString(dir.resolve("init.log")));
    }
    Process daemon =
        new ProcessBuilder(BIN.toString(), "serve", "-c", config.toString())
            .redirectErrorStream(true)
            .redirectOutput(dir.resolve("daemon.log").toFile())
            .start();
    Runtime.getRuntime().addShutdownHook(new Thread(daemon::destroy));
    waitFor("the daemon to be ready", Duration.ofSeconds(60), () -> ready(socket));
    return new TestDaemon(
        socket,
        URI.create("http://127.0.0.1:" + port),
        URI.create("http://127.0.0.1:" + apiPort),
        URI.create("http://127.0.0.1:" + metricsPort + "/metrics"));
  }

  /** The daemon's metrics now. */
  String scrape() throws IOException, InterruptedException {
    HttpResponse<String> r =
        HttpClient.newHttpClient()
            .send(HttpRequest.newBuilder(metrics).build(), HttpResponse.BodyHandlers.ofString());
    return r.body();
  }

  /** The value of one sample ({@code name{labels}}), 0 if absent. */
  double sample(String sample) throws IOException, InterruptedException {
    return scrape()
        .lines()
        .filter(l -> l.startsWith(sample + " "))
        .mapToDouble(l -> Double.parseDouble(l.substring(sample.length() + 1)))
        .findFirst()
        .orElse(0);
  }

  /** A new connection to the daemon. */
  Client client() throws IOException {
    return Client.connect(socket);
  }

  private static boolean ready(Path socket) {
    if (!Files.exists(socket)) {
      return false;
    }
    try (Client c = Client.connect(socket)) {
      return c.health().get().ready();
    } catch (Exception e) {
      return false;
    }
  }

  private static boolean listens(int port) {
    try (Socket s = new Socket(InetAddress.getLoopbackAddress(), port)) {
      return s.isConnected();
    } catch (IOException e) {
      return false;
    }
  }

  static int freePort() throws IOException {
    try (ServerSocket s = new ServerSocket(0, 1, InetAddress.getLoopbackAddress())) {
      return s.getLocalPort();
    }
  }

  interface Check {
    boolean holds() throws Exception;
  }

  static void waitFor(String what, Duration limit, Check check) throws Exception {
    Instant deadline = Instant.now().plus(limit);
    while (!check.holds()) {
      if (Instant.now().isAfter(deadline)) {
        throw new IllegalStateException("timed out waiting for " + what);
      }
      Thread.sleep(50);
    }
  }

  /** Random alphanumeric names, like the shared backend suite's. */
  static String name() {
    String chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    StringBuilder b = new StringBuilder();
    java.util.concurrent.ThreadLocalRandom r = java.util.concurrent.ThreadLocalRandom.current();
    for (int i = 0, n = 8 + r.nextInt(24); i < n; i++) {
      b.append(chars.charAt(r.nextInt(chars.length())));
    }
    return b.toString();
  }

  static List<String> strings(List<byte[]> values) {
    return values.stream().map(v -> new String(v, java.nio.charset.StandardCharsets.UTF_8)).toList();
  }
}
