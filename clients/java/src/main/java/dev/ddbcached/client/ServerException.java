package dev.ddbcached.client;

/**
 * The daemon answered with an error response. {@link #code()} is the stable number;
 * {@link #errorCode()} is {@code null} for a number this client does not know.
 */
public final class ServerException extends DdbcachedException {
  private static final long serialVersionUID = 1L;

  private final int code;
  private final transient ErrorCode errorCode;
  private final String serverMessage;

  ServerException(int code, String serverMessage) {
    super(describe(code, serverMessage));
    this.code = code;
    this.errorCode = ErrorCode.of(code);
    this.serverMessage = serverMessage;
  }

  private static String describe(int code, String message) {
    ErrorCode known = ErrorCode.of(code);
    String name = known == null ? "error " + code : known.wireName() + " (" + code + ")";
    return name + ": " + message;
  }

  /** The error's number on the wire. */
  public int code() {
    return code;
  }

  /** The error code, or {@code null} when this client does not know the number. */
  public ErrorCode errorCode() {
    return errorCode;
  }

  /** The daemon's message. */
  public String serverMessage() {
    return serverMessage;
  }

  /**
   * Whether a write that failed with this error may nevertheless have been applied: only a
   * {@code timeout} leaves the outcome unknown (see PROTOCOL.md). The client never retries.
   */
  public boolean outcomeUnknown() {
    return errorCode == ErrorCode.TIMEOUT;
  }
}
