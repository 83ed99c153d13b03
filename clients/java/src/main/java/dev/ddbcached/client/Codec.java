package dev.ddbcached.client;

import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.List;
import org.msgpack.core.MessageBufferPacker;
import org.msgpack.core.MessagePack;
import org.msgpack.core.MessagePackException;
import org.msgpack.core.MessageUnpacker;
import org.msgpack.value.ValueType;

/**
 * Bytes to messages and back, as docs/PROTOCOL.md defines them: a frame is a 4-byte big-endian
 * length that does not count itself, then a MessagePack map. Requests are written field by field
 * in wire order; responses are read into a {@link Response} whatever their operation, since the
 * wire format does not name it (the request id routes a response to the request it answers).
 */
final class Codec {
  private Codec() {}

  /** A request: its operation and its fields, kept in the order they are written. */
  static final class Request {
    final String op;
    private final List<String> names = new ArrayList<>();
    private final List<Object> values = new ArrayList<>();

    Request(String op) {
      this.op = op;
    }

    Request str(String name, String value) {
      return add(name, value);
    }

    Request bin(String name, byte[] value) {
      return add(name, value);
    }

    Request integer(String name, long value) {
      return add(name, value);
    }

    /** An optional integer, left out when {@code null}. */
    Request optional(String name, Long value) {
      return value == null ? this : add(name, value);
    }

    /** A flag, sent only when set (absent means false). */
    Request flag(String name, boolean value) {
      return value ? add(name, Boolean.TRUE) : this;
    }

    private Request add(String name, Object value) {
      names.add(name);
      values.add(value);
      return this;
    }
  }

  /** The whole frame of a request, length prefix included. */
  static byte[] encode(long id, Request request) {
    try (MessageBufferPacker p = MessagePack.newDefaultBufferPacker()) {
      p.packMapHeader(2 + request.names.size());
      p.packString("id").packLong(id);
      p.packString("op").packString(request.op);
      for (int i = 0; i < request.names.size(); i++) {
        p.packString(request.names.get(i));
        Object v = request.values.get(i);
        if (v instanceof String s) {
          p.packString(s);
        } else if (v instanceof byte[] b) {
          p.packBinaryHeader(b.length).writePayload(b);
        } else if (v instanceof Long n) {
          p.packLong(n);
        } else {
          p.packBoolean((Boolean) v);
        }
      }
      byte[] body = p.toByteArray();
      byte[] frame = new byte[4 + body.length];
      frame[0] = (byte) (body.length >>> 24);
      frame[1] = (byte) (body.length >>> 16);
      frame[2] = (byte) (body.length >>> 8);
      frame[3] = (byte) body.length;
      System.arraycopy(body, 0, frame, 4, body.length);
      return frame;
    } catch (IOException e) {
      // A buffer packer writes to memory only.
      throw new IllegalStateException("packing into memory failed", e);
    }
  }

  /** A response map, every field optional. */
  static final class Response {
    Long id;
    int code;
    String message = "";
    Long version;
    String server;
    Long maxFrameBytes;
    Boolean ready;
    String detail;
    Boolean found;
    Long ts;
    byte[] value;
    Long index;
    /** Items of a streamed piece: {@code Long}, {@code byte[]} or {@link Entry}. */
    List<Object> items;
    boolean more;

    boolean isError() {
      return code != 0;
    }

    /** Whether no further frame answers the same request. */
    boolean isLast() {
      return isError() || !more;
    }

    ServerException error() {
      return new ServerException(code, message);
    }

    <T> T need(T field, String name, String op) {
      if (field == null) {
        throw new ProtocolException("the " + op + " answer lacks `" + name + "`");
      }
      return field;
    }
  }

  /** Reads a response body. */
  static Response decode(byte[] body) {
    try (MessageUnpacker u = MessagePack.newDefaultUnpacker(body)) {
      Response r = new Response();
      int fields = u.unpackMapHeader();
      for (int i = 0; i < fields; i++) {
        String name = u.unpackString();
        if (u.getNextFormat().getValueType() == ValueType.NIL) {
          u.unpackNil();
          continue;
        }
        switch (name) {
          case "id" -> r.id = u.unpackLong();
          case "code" -> r.code = u.unpackInt();
          case "message" -> r.message = u.unpackString();
          case "version" -> r.version = u.unpackLong();
          case "server" -> r.server = u.unpackString();
          case "max_frame_bytes" -> r.maxFrameBytes = u.unpackLong();
          case "ready" -> r.ready = u.unpackBoolean();
          case "detail" -> r.detail = u.unpackString();
          case "found" -> r.found = u.unpackBoolean();
          case "ts" -> r.ts = u.unpackLong();
          case "value" -> r.value = binary(u);
          case "index" -> r.index = u.unpackLong();
          case "items" -> r.items = items(u);
          case "more" -> r.more = u.unpackBoolean();
          default -> u.skipValue();
        }
      }
      return r;
    } catch (IOException | MessagePackException e) {
      throw new ProtocolException("a response is not a MessagePack map of the documented shape", e);
    }
  }

  private static byte[] binary(MessageUnpacker u) throws IOException {
    // Text where binary is expected is read as its UTF-8 bytes, as the daemon reads requests.
    if (u.getNextFormat().getValueType() == ValueType.STRING) {
      return u.unpackString().getBytes(StandardCharsets.UTF_8);
    }
    return u.readPayload(u.unpackBinaryHeader());
  }

  private static List<Object> items(MessageUnpacker u) throws IOException {
    int n = u.unpackArrayHeader();
    List<Object> items = new ArrayList<>(n);
    for (int i = 0; i < n; i++) {
      ValueType t = u.getNextFormat().getValueType();
      if (t == ValueType.INTEGER) {
        items.add(u.unpackLong());
      } else if (t == ValueType.ARRAY) {
        if (u.unpackArrayHeader() != 2) {
          throw new ProtocolException("a kv.scan item is not a [key, value] pair");
        }
        items.add(new Entry(binary(u), binary(u)));
      } else {
        items.add(binary(u));
      }
    }
    return items;
  }
}
