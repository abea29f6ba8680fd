package dev.keystone.bench.kstreams;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import com.fasterxml.jackson.databind.node.ObjectNode;
import java.time.Duration;
import java.util.HashMap;
import java.util.Map;
import java.util.Properties;
import java.util.concurrent.CountDownLatch;
import org.apache.kafka.common.serialization.Serdes;
import org.apache.kafka.streams.KafkaStreams;
import org.apache.kafka.streams.StreamsBuilder;
import org.apache.kafka.streams.StreamsConfig;
import org.apache.kafka.streams.kstream.Consumed;
import org.apache.kafka.streams.kstream.Produced;
import org.apache.kafka.streams.state.Stores;

/**
 * The Kafka Streams peer of the Kafka-mode scenarios (S5, S6): a real KafkaStreams
 * application against the broker. Reads the events topic (keyed by event_id), drops
 * redeliveries with the S2 processor of {@link BenchTopology} (the first event per id
 * passes; a later one with ts < t0 + window is dropped, t0 the ts of the last event
 * that passed; keys expire on stream time), projects event_id, user_id and amount,
 * and writes to the output topic. State: an in-memory key-value
 * store with its changelog topic (Kafka Streams' default logging), as Keystone keeps
 * its dedup state in memory with a changelog topic.
 *
 * <p>Runs until stopped (SIGTERM: closes the application, which commits); the
 * harness stops it once the output holds every expected record.
 */
public final class KafkaApp {
  private KafkaApp() {}

  static final ObjectMapper MAPPER = new ObjectMapper();
  static final String STORE = BenchTopology.STORE;

  public static void main(String[] args) throws Exception {
    Map<String, String> opts = new HashMap<>();
    for (int i = 0; i + 1 < args.length; i += 2) {
      opts.put(args[i].replaceFirst("^--", ""), args[i + 1]);
    }
    long windowMs = Long.parseLong(opts.getOrDefault("window-ms", "600000"));
    boolean exactlyOnce = "exactly-once".equals(opts.get("delivery"));

    Properties p = new Properties();
    p.put(StreamsConfig.APPLICATION_ID_CONFIG, opts.get("app-id"));
    p.put(StreamsConfig.BOOTSTRAP_SERVERS_CONFIG, opts.get("bootstrap"));
    p.put(StreamsConfig.NUM_STREAM_THREADS_CONFIG, opts.getOrDefault("threads", "1"));
    p.put(StreamsConfig.COMMIT_INTERVAL_MS_CONFIG, opts.getOrDefault("commit-ms", "1000"));
    p.put(
        StreamsConfig.PROCESSING_GUARANTEE_CONFIG,
        exactlyOnce ? StreamsConfig.EXACTLY_ONCE_V2 : StreamsConfig.AT_LEAST_ONCE);
    p.put(StreamsConfig.STATE_DIR_CONFIG, opts.get("state-dir"));
    p.put(StreamsConfig.consumerPrefix("auto.offset.reset"), "earliest");
    p.put(StreamsConfig.REPLICATION_FACTOR_CONFIG, 1);

    StreamsBuilder b = new StreamsBuilder();
    b.addStateStore(
        Stores.keyValueStoreBuilder(
            Stores.inMemoryKeyValueStore(STORE), Serdes.String(), Serdes.Long()));
    // Record time = the event's ts, as TopologyTestDriver is fed in BenchTopology
    // and as Flink assigns event time: the dedup processor expires keys on it.
    b.stream(
            opts.get("in-topic"),
            Consumed.with(Serdes.String(), Serdes.String())
                .withTimestampExtractor((rec, prev) -> BenchTopology.ts((String) rec.value())))
        .process(() -> new BenchTopology.Dedup(windowMs), STORE)
        .mapValues(KafkaApp::project)
        .to(opts.get("out-topic"), Produced.with(Serdes.String(), Serdes.String()));

    KafkaStreams streams = new KafkaStreams(b.build(), p);
    CountDownLatch closed = new CountDownLatch(1);
    Runtime.getRuntime()
        .addShutdownHook(
            new Thread(
                () -> {
                  streams.close(Duration.ofSeconds(20));
                  closed.countDown();
                }));
    streams.start();
    closed.await();
  }

  /** S1's projection of an event (JSON text): event_id, user_id, amount. */
  static String project(String line) {
    try {
      JsonNode ev = MAPPER.readTree(line);
      ObjectNode o = MAPPER.createObjectNode();
      o.set("event_id", ev.get("event_id"));
      o.set("user_id", ev.get("user_id"));
      o.set("amount", ev.get("amount"));
      return MAPPER.writeValueAsString(o);
    } catch (java.io.IOException e) {
      throw new RuntimeException(e);
    }
  }
}
