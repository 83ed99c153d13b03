package dev.ddbcached.client;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import java.io.IOException;
import java.util.HexFormat;
import java.util.Iterator;
import java.util.List;
import java.util.Map;
import org.junit.jupiter.api.Test;
import org.msgpack.core.MessageBufferPacker;
import org.msgpack.core.MessagePack;

/**
 * The shared wire-format vectors (protocol/vectors.json), which the Rust codec and the Python
 * client check too: this client writes every request frame byte for byte, and reads every
 * response frame into the documented fields.
 */
class VectorsTest {
  private static final HexFormat HEX = HexFormat.of();

  @Test
  void theCodecWritesAndReadsEveryVector() throws IOException {
    JsonNode file = new ObjectMapper().readTree(TestDaemon.ROOT.resolve("protocol/vectors.json").toFile());
    int checked = 0;
    for (JsonNode v : file.get("vectors")) {
      String name = v.get("name").asText();
      byte[] frame = HEX.parseHex(v.get("frame").asText());
      JsonNode body = v.get("body");
      assertArrayEquals(frame, framed(pack(body)), name + ": msgpack-core packs the map to the frame");
      if (v.get("kind").asText().equals("request")) {
        assertArrayEquals(frame, Codec.encode(body.get("id").asLong(), request(body)), name);
      } else {
        byte[] payload = java.util.Arrays.copyOfRange(frame, 4, frame.length);
        assertResponse(name, body, Codec.decode(payload));
      }
      checked++;
    }
    assertTrue(checked >= 9, "vectors checked: " + checked);
  }

  /** The request the JSON map describes, fields in its order after `id` and `op`. */
  private static Codec.Request request(JsonNode body) {
    Codec.Request r = new Codec.Request(body.get("op").asText());
    for (Iterator<Map.Entry<String, JsonNode>> it = body.fields(); it.hasNext(); ) {
      Map.Entry<String, JsonNode> f = it.next();
      JsonNode value = f.getValue();
      switch (f.getKey()) {
        case "id", "op" -> {}
        default -> {
          if (value.isObject()) {
            r.bin(f.getKey(), HEX.parseHex(value.get("bin").asText()));
          } else if (value.isTextual()) {
            r.str(f.getKey(), value.asText());
          } else if (value.isBoolean()) {
            r.flag(f.getKey(), value.asBoolean());
          } else {
            r.integer(f.getKey(), value.asLong());
          }
        }
      }
    }
    return r;
  }

  private static void assertResponse(String name, JsonNode body, Codec.Response r) {
    assertEquals(body.get("id").asLong(), r.id, name);
    assertEquals(body.get("code").asInt(), r.code, name);
    if (body.has("server")) {
      assertEquals(body.get("server").asText(), r.server, name);
      assertEquals(body.get("max_frame_bytes").asLong(), r.maxFrameBytes, name);
    }
    if (body.has("found")) {
      assertEquals(body.get("found").asBoolean(), r.found, name);
    }
    if (body.has("ts")) {
      assertEquals(body.get("ts").asLong(), r.ts, name);
    }
    if (body.has("value")) {
      assertArrayEquals(HEX.parseHex(body.get("value").get("bin").asText()), r.value, name);
    }
    if (body.has("index")) {
      assertEquals(body.get("index").asLong(), r.index, name);
    }
    if (body.has("message")) {
      assertEquals(body.get("message").asText(), r.message, name);
    }
    if (body.has("items")) {
      List<Object> items = r.items;
      assertEquals(body.get("items").size(), items.size(), name);
      for (int i = 0; i < items.size(); i++) {
        JsonNode pair = body.get("items").get(i);
        Entry e = (Entry) items.get(i);
        assertArrayEquals(HEX.parseHex(pair.get(0).get("bin").asText()), e.key(), name);
        assertArrayEquals(HEX.parseHex(pair.get(1).get("bin").asText()), e.value(), name);
      }
      assertEquals(body.get("more").asBoolean(), r.more, name);
    }
  }

  /** Packs a JSON value as the vectors describe it: {"bin": hex} is binary. */
  private static byte[] pack(JsonNode value) throws IOException {
    try (MessageBufferPacker p = MessagePack.newDefaultBufferPacker()) {
      pack(p, value);
      return p.toByteArray();
    }
  }

  private static void pack(MessageBufferPacker p, JsonNode v) throws IOException {
    if (v.isObject() && v.size() == 1 && v.has("bin")) {
      byte[] b = HEX.parseHex(v.get("bin").asText());
      p.packBinaryHeader(b.length).writePayload(b);
    } else if (v.isObject()) {
      p.packMapHeader(v.size());
      for (Iterator<Map.Entry<String, JsonNode>> it = v.fields(); it.hasNext(); ) {
        Map.Entry<String, JsonNode> f = it.next();
        p.packString(f.getKey());
        pack(p, f.getValue());
      }
    } else if (v.isArray()) {
      p.packArrayHeader(v.size());
      for (JsonNode item : v) {
        pack(p, item);
      }
    } else if (v.isTextual()) {
      p.packString(v.asText());
    } else if (v.isBoolean()) {
      p.packBoolean(v.asBoolean());
    } else if (v.isNull()) {
      p.packNil();
    } else {
      p.packLong(v.asLong());
    }
  }

  private static byte[] framed(byte[] body) {
    return java.nio.ByteBuffer.allocate(4 + body.length).putInt(body.length).put(body).array();
  }
}
