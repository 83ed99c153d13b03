package dev.ddbcached.client;

import java.io.IOException;
import java.net.InetAddress;
import java.net.ServerSocket;
import java.net.Socket;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.time.Instant;
import java.util.List;

/**
 * A real daemon for the tests of this JVM: DynamoDB Local (installed by the repository's
 * scripts/dynamodb-local.sh) on a free loopback port, the tables, and the {@code ddbcached}
 * binary on a socket of its own. Started once, stopped when the JVM exits.
 */
final class TestDaemon {
  static final Path ROOT = Path.of(System.getProperty("ddbcached.root", "../.."));
  static final Path BIN = Path.of(System.getProperty("ddbcached.bin", "../../target/debug/ddbcached"));

  private static TestDaemon instance;

  final Path socket;

  private TestDaemon(Path socket) {
    this.socket = socket;
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
            "[metrics]",
            "listen = \"\"",
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
    return new TestDaemon(socket);
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
