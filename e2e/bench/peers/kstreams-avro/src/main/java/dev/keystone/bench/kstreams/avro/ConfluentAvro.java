package dev.keystone.bench.kstreams.avro;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.net.URI;
import java.net.URLEncoder;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import java.util.concurrent.ConcurrentHashMap;
import org.apache.avro.Schema;
import org.apache.avro.generic.GenericDatumReader;
import org.apache.avro.generic.GenericDatumWriter;
import org.apache.avro.generic.GenericRecord;
import org.apache.avro.io.BinaryDecoder;
import org.apache.avro.io.BinaryEncoder;
import org.apache.avro.io.DecoderFactory;
import org.apache.avro.io.EncoderFactory;
import org.apache.kafka.common.errors.SerializationException;
import org.apache.kafka.common.serialization.Deserializer;
import org.apache.kafka.common.serialization.Serde;
import org.apache.kafka.common.serialization.Serdes;
import org.apache.kafka.common.serialization.Serializer;

/**
 * A Confluent-framing Avro serde over Apache Avro's Java library: magic byte 0, the
 * schema id in 4 bytes big-endian, the Avro binary datum. The deserializer fetches
 * each writer schema by id from the registry's Confluent-compatible REST API
 * ({@code GET /schemas/ids/{id}}, java.net.http) once and caches its reader; the
 * serializer registers its schema under a subject once ({@code POST
 * /subjects/{subject}/versions}) and writes with the id it gets. What Confluent's and
 * Apicurio's serdes do on the data path, without their dependency trees.
 */
final class ConfluentAvro {
  private ConfluentAvro() {}

  static final ObjectMapper MAPPER = new ObjectMapper();
  static final String CONTENT_TYPE = "application/vnd.schemaregistry.v1+json";

  /** The registry's REST API (base URL, e.g. Apicurio's .../apis/ccompat/v7). */
  static final class Registry {
    private final String base;
    private final HttpClient http = HttpClient.newHttpClient();
    private final ConcurrentHashMap<Integer, Schema> byId = new ConcurrentHashMap<>();

    Registry(String base) {
      this.base = base.replaceAll("/+$", "");
    }

    Schema schema(int id) {
      return byId.computeIfAbsent(
          id,
          k -> {
            JsonNode answer = call(HttpRequest.newBuilder(URI.create(base + "/schemas/ids/" + k)).GET());
            return new Schema.Parser().parse(answer.get("schema").asText());
          });
    }

    int register(String subject, Schema schema) {
      try {
        String body = MAPPER.writeValueAsString(MAPPER.createObjectNode().put("schema", schema.toString()));
        String path = "/subjects/" + URLEncoder.encode(subject, StandardCharsets.UTF_8) + "/versions";
        JsonNode answer =
            call(
                HttpRequest.newBuilder(URI.create(base + path))
                    .header("Content-Type", CONTENT_TYPE)
                    .POST(HttpRequest.BodyPublishers.ofString(body)));
        int id = answer.get("id").asInt();
        byId.put(id, schema);
        return id;
      } catch (IOException e) {
        throw new SerializationException(e);
      }
    }

    private JsonNode call(HttpRequest.Builder request) {
      try {
        HttpResponse<String> r =
            http.send(request.header("Accept", CONTENT_TYPE).build(), HttpResponse.BodyHandlers.ofString());
        if (r.statusCode() / 100 != 2) {
          throw new SerializationException("schema registry: HTTP " + r.statusCode() + ": " + r.body());
        }
        return MAPPER.readTree(r.body());
      } catch (IOException e) {
        throw new SerializationException(e);
      } catch (InterruptedException e) {
        Thread.currentThread().interrupt();
        throw new SerializationException(e);
      }
    }
  }

  /** Reads framed records with their writer schema (one reader per id, cached). */
  static final class Reader implements Deserializer<GenericRecord> {
    private final Registry registry;
    private final ConcurrentHashMap<Integer, GenericDatumReader<GenericRecord>> readers =
        new ConcurrentHashMap<>();
    private BinaryDecoder decoder;

    Reader(Registry registry) {
      this.registry = registry;
    }

    @Override
    public GenericRecord deserialize(String topic, byte[] data) {
      if (data == null) {
        return null;
      }
      if (data.length < 5 || data[0] != 0) {
        throw new SerializationException("not the Confluent wire format");
      }
      int id = ByteBuffer.wrap(data, 1, 4).getInt();
      GenericDatumReader<GenericRecord> reader =
          readers.computeIfAbsent(id, k -> new GenericDatumReader<>(registry.schema(k)));
      decoder = DecoderFactory.get().binaryDecoder(data, 5, data.length - 5, decoder);
      try {
        return reader.read(null, decoder);
      } catch (IOException e) {
        throw new SerializationException(e);
      }
    }
  }

  /** Writes records of one schema, registered under `subject` on first use. */
  static final class Writer implements Serializer<GenericRecord> {
    private final Registry registry;
    private final String subject;
    private final Schema schema;
    private final GenericDatumWriter<GenericRecord> writer;
    private final ByteArrayOutputStream out = new ByteArrayOutputStream(128);
    private BinaryEncoder encoder;
    private int id = -1;

    Writer(Registry registry, String subject, Schema schema) {
      this.registry = registry;
      this.subject = subject;
      this.schema = schema;
      this.writer = new GenericDatumWriter<>(schema);
    }

    @Override
    public byte[] serialize(String topic, GenericRecord record) {
      if (record == null) {
        return null;
      }
      if (id < 0) {
        id = registry.register(subject, schema);
      }
      out.reset();
      out.write(0);
      out.write(id >>> 24);
      out.write(id >>> 16);
      out.write(id >>> 8);
      out.write(id);
      encoder = EncoderFactory.get().directBinaryEncoder(out, encoder);
      try {
        writer.write(record, encoder);
        encoder.flush();
      } catch (IOException e) {
        throw new SerializationException(e);
      }
      return out.toByteArray();
    }
  }

  /** A serde whose serializer writes `schema` under `subject`. */
  static Serde<GenericRecord> serde(Registry registry, String subject, Schema schema) {
    return Serdes.serdeFrom(new Writer(registry, subject, schema), new Reader(registry));
  }
}
