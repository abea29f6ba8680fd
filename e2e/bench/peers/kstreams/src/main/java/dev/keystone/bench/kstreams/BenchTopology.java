package dev.keystone.bench.kstreams;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import com.fasterxml.jackson.databind.node.ObjectNode;
import java.io.BufferedReader;
import java.io.BufferedWriter;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Paths;
import java.time.Duration;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import org.apache.kafka.common.serialization.Serdes;
import org.apache.kafka.common.serialization.StringDeserializer;
import org.apache.kafka.common.serialization.StringSerializer;
import org.apache.kafka.streams.KeyValue;
import org.apache.kafka.streams.StreamsBuilder;
import org.apache.kafka.streams.StreamsConfig;
import org.apache.kafka.streams.TestInputTopic;
import org.apache.kafka.streams.TestOutputTopic;
import org.apache.kafka.streams.Topology;
import org.apache.kafka.streams.TopologyTestDriver;
import org.apache.kafka.streams.kstream.Consumed;
import org.apache.kafka.streams.kstream.KStream;
import org.apache.kafka.streams.kstream.Produced;
import org.apache.kafka.streams.processor.PunctuationType;
import org.apache.kafka.streams.processor.api.Processor;
import org.apache.kafka.streams.processor.api.ProcessorContext;
import org.apache.kafka.streams.processor.api.Record;
import org.apache.kafka.streams.state.KeyValueIterator;
import org.apache.kafka.streams.state.KeyValueStore;
import org.apache.kafka.streams.state.StoreBuilder;
import org.apache.kafka.streams.state.Stores;

/**
 * The Kafka Streams peer of the Keystone benchmarks, engine only: the S1 and S2
 * topologies driven by TopologyTestDriver (one thread, no broker). The same
 * topologies run against a broker with KafkaStreams; TopologyTestDriver leaves out
 * the network and the consumer/producer, so it is an upper bound of what Kafka
 * Streams' processing costs per record, not a Kafka-mode result.
 *
 * <p>Prints {@code KSBENCH_JOB_MS <ms>}: from the first record piped in to the
 * last output written, without JVM start and topology build.
 */
public final class BenchTopology {
  private BenchTopology() {}

  static final ObjectMapper MAPPER = new ObjectMapper();
  static final String STORE = "first-seen";

  public static void main(String[] args) throws Exception {
    Map<String, String> opts = new HashMap<>();
    for (int i = 0; i + 1 < args.length; i += 2) {
      opts.put(args[i].replaceFirst("^--", ""), args[i + 1]);
    }
    String scenario = opts.get("scenario");
    long windowMs = Long.parseLong(opts.getOrDefault("window-ms", "600000"));
    boolean inMemory = opts.getOrDefault("backend", "rocksdb").equals("heap");
    String output = opts.get("output");

    StreamsBuilder builder = new StreamsBuilder();
    KStream<String, String> in = builder.stream("in", Consumed.with(Serdes.String(), Serdes.String()));
    switch (scenario) {
      case "s1":
        in.flatMapValues(BenchTopology::filterProject).to("out", Produced.with(Serdes.String(), Serdes.String()));
        break;
      case "s2": {
        StoreBuilder<KeyValueStore<String, Long>> store =
            Stores.keyValueStoreBuilder(
                    inMemory ? Stores.inMemoryKeyValueStore(STORE) : Stores.persistentKeyValueStore(STORE),
                    Serdes.String(),
                    Serdes.Long())
                .withLoggingDisabled();
        builder.addStateStore(store);
        in.process(() -> new Dedup(windowMs), STORE).to("out", Produced.with(Serdes.String(), Serdes.String()));
        break;
      }
      default:
        throw new IllegalArgumentException("Kafka Streams peer has no scenario " + scenario);
    }
    Topology topology = builder.build();

    Properties props = new Properties();
    props.put(StreamsConfig.APPLICATION_ID_CONFIG, "keystone-bench-" + scenario);
    props.put(StreamsConfig.BOOTSTRAP_SERVERS_CONFIG, "unused:9092");
    props.put(StreamsConfig.STATE_DIR_CONFIG, Paths.get(output).getParent().resolve("kstreams-state").toString());

    long start;
    long end;
    try (TopologyTestDriver driver = new TopologyTestDriver(topology, props);
        BufferedReader r = Files.newBufferedReader(Paths.get(opts.get("input")), StandardCharsets.UTF_8);
        BufferedWriter w = Files.newBufferedWriter(Paths.get(output), StandardCharsets.UTF_8)) {
      TestInputTopic<String, String> inTopic =
          driver.createInputTopic("in", new StringSerializer(), new StringSerializer());
      TestOutputTopic<String, String> outTopic =
          driver.createOutputTopic("out", new StringDeserializer(), new StringDeserializer());
      start = System.nanoTime();
      String line;
      long n = 0;
      while ((line = r.readLine()) != null) {
        // The record timestamp stands for the producer's: the event's ts.
        inTopic.pipeInput(null, line, ts(line));
        if (++n % 10_000 == 0) {
          drain(outTopic, w);
        }
      }
      drain(outTopic, w);
      w.flush();
      end = System.nanoTime();
    }
    System.out.println("KSBENCH_JOB_MS " + (end - start) / 1_000_000);
  }

  static void drain(TestOutputTopic<String, String> out, BufferedWriter w) throws java.io.IOException {
    for (String v : out.readValuesToList()) {
      w.write(v);
      w.write('\n');
    }
  }

  static long ts(String line) {
    int at = line.indexOf("\"ts\":");
    if (at < 0) {
      return 0;
    }
    long v = 0;
    for (int i = at + 5; i < line.length() && Character.isDigit(line.charAt(i)); i++) {
      v = v * 10 + (line.charAt(i) - '0');
    }
    return v;
  }

  /** S1: keep `!bot && action in [view, purchase]`, project event_id, user_id, amount. */
  static List<String> filterProject(String line) {
    try {
      JsonNode ev = MAPPER.readTree(line);
      String action = ev.path("action").asText();
      if (ev.path("bot").asBoolean() || !(action.equals("view") || action.equals("purchase"))) {
        return List.of();
      }
      ObjectNode o = MAPPER.createObjectNode();
      o.set("event_id", ev.get("event_id"));
      o.set("user_id", ev.get("user_id"));
      o.set("amount", ev.get("amount"));
      return List.of(MAPPER.writeValueAsString(o));
    } catch (java.io.IOException e) {
      throw new RuntimeException(e);
    }
  }

  /**
   * S2: the first event per event_id passes; one with ts < t0 + window is dropped.
   * Keys are deleted once stream time passes t0 + window (a punctuation every window/8).
   */
  static final class Dedup implements Processor<String, String, String, String> {
    private final long windowMs;
    private ProcessorContext<String, String> ctx;
    private KeyValueStore<String, Long> store;

    Dedup(long windowMs) {
      this.windowMs = windowMs;
    }

    @Override
    public void init(ProcessorContext<String, String> context) {
      ctx = context;
      store = context.getStateStore(STORE);
      context.schedule(Duration.ofMillis(Math.max(1, windowMs / 8)), PunctuationType.STREAM_TIME, now -> {
        List<String> expired = new ArrayList<>();
        try (KeyValueIterator<String, Long> it = store.all()) {
          while (it.hasNext()) {
            KeyValue<String, Long> kv = it.next();
            if (kv.value + windowMs <= now) {
              expired.add(kv.key);
            }
          }
        }
        for (String k : expired) {
          store.delete(k);
        }
      });
    }

    @Override
    public void process(Record<String, String> record) {
      JsonNode ev;
      try {
        ev = MAPPER.readTree(record.value());
      } catch (java.io.IOException e) {
        throw new RuntimeException(e);
      }
      String id = ev.get("event_id").asText();
      long ts = ev.get("ts").asLong();
      Long t0 = store.get(id);
      if (t0 != null && ts < t0 + windowMs) {
        return;
      }
      store.put(id, ts);
      ctx.forward(record);
    }
  }
}
