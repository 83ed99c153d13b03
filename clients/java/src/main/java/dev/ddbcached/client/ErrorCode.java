package dev.ddbcached.client;

/**
 * The stable error codes of the protocol (docs/PROTOCOL.md, "Errors"). A code keeps its number
 * and meaning in every version; a code this client does not know is reported by number.
 */
public enum ErrorCode {
  MALFORMED(1, "malformed"),
  UNKNOWN_OPERATION(2, "unknown_operation"),
  INVALID_ARGUMENT(3, "invalid_argument"),
  FRAME_TOO_LARGE(4, "frame_too_large"),
  VALUE_TOO_LARGE(5, "value_too_large"),
  HANDSHAKE_REQUIRED(6, "handshake_required"),
  UNSUPPORTED_VERSION(7, "unsupported_version"),
  UNAVAILABLE(16, "unavailable"),
  THROTTLED(17, "throttled"),
  TIMEOUT(18, "timeout"),
  CONFLICT(19, "conflict"),
  BACKEND(20, "backend"),
  SHUTTING_DOWN(21, "shutting_down"),
  INTERNAL(255, "internal");

  private final int code;
  private final String wireName;

  ErrorCode(int code, String wireName) {
    this.code = code;
    this.wireName = wireName;
  }

  /** The number on the wire. */
  public int code() {
    return code;
  }

  /** The snake_case name the protocol document uses. */
  public String wireName() {
    return wireName;
  }

  /** The code with this number, or {@code null} for one this client does not know. */
  public static ErrorCode of(int code) {
    for (ErrorCode c : values()) {
      if (c.code == code) {
        return c;
      }
    }
    return null;
  }
}
