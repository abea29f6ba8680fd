package dev.keystone.bench.kstreams.avro;

import java.time.Duration;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.concurrent.CountDownLatch;
import org.apache.avro.Schema;
import org.apache.avro.generic.GenericData;
import org.apache.avro.generic.GenericRecord;
import org.apache.kafka.common.serialization.Serde;
import org.apache.kafka.common.serialization.Serdes;
import org.apache.kafka.streams.KafkaStreams;
import org.apache.kafka.streams.KeyValue;
import org.apache.kafka.streams.StreamsBuilder;
import org.apache.kafka.streams.StreamsConfig;
import org.apache.kafka.streams.kstream.Consumed;
import org.apache.kafka.streams.kstream.Produced;
import org.apache.kafka.streams.processor.PunctuationType;
import org.apache.kafka.streams.processor.api.Processor;
import org.apache.kafka.streams.processor.api.ProcessorContext;
import org.apache.kafka.streams.processor.api.Record;
import org.apache.kafka.streams.state.KeyValueIterator;
import org.apache.kafka.streams.state.KeyValueStore;
import org.apache.kafka.streams.state.Stores;

/**
 * The Kafka Streams peer of S12: S5's KafkaApp (peers/kstreams) on Avro values. Reads
 * the Avro events topic (Confluent framing, keyed by event_id), drops redeliveries
 * with S2's rule (the first event per id passes; a later one with ts &lt; t0 + window
 * is dropped, t0 the ts of the last event that passed; keys expire on stream time),
 * projects event_id, user_id and amount into a record of its own schema (registered
 * under {@code <out-topic>-value}) and writes it framed. In-memory key-value store
 * with its changelog topic, as in S5.
 *
 * <p>Runs until stopped (SIGTERM closes the application, which commits).
 */
public final class AvroApp {
  private AvroApp() {}

  static final String STORE = "first-seen";

  static final Schema OUT =
      new Schema.Parser()
          .parse(
              "{\"type\":\"record\",\"name\":\"Projected\",\"namespace\":\"dev.keystone.bench\",\"fields\":["
                  + "{\"name\":\"event_id\",\"type\":\"string\"},"
                  + "{\"name\":\"user_id\",\"type\":\"string\"},"
                  + "{\"name\":\"amount\",\"type\":\"double\"}]}");

  public static void main(String[] args) throws Exception {
    Map<String, String> opts = new HashMap<>();
    for (int i = 0; i + 1 < args.length; i += 2) {
      opts.put(args[i].replaceFirst("^--", ""), args[i + 1]);
    }
    long windowMs = Long.parseLong(opts.getOrDefault("window-ms", "600000"));
    boolean exactlyOnce = "exactly-once".equals(opts.get("delivery"));
    String outTopic = opts.get("out-topic");

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

    ConfluentAvro.Registry registry = new ConfluentAvro.Registry(opts.get("registry"));
    Serde<GenericRecord> avro = ConfluentAvro.serde(registry, outTopic + "-value", OUT);

    StreamsBuilder b = new StreamsBuilder();
    b.addStateStore(
        Stores.keyValueStoreBuilder(
            Stores.inMemoryKeyValueStore(STORE), Serdes.String(), Serdes.Long()));
    // Record time = the event's ts, as in S5's KafkaApp: the dedup expires keys on it.
    b.stream(
            opts.get("in-topic"),
            Consumed.with(Serdes.String(), avro)
                .withTimestampExtractor((rec, prev) -> (Long) ((GenericRecord) rec.value()).get("ts")))
        .process(() -> new Dedup(windowMs), STORE)
        .mapValues(AvroApp::project)
        .to(outTopic, Produced.with(Serdes.String(), avro));

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

  /** S1's projection: event_id, user_id, amount. */
  static GenericRecord project(GenericRecord ev) {
    GenericData.Record o = new GenericData.Record(OUT);
    o.put(0, ev.get("event_id"));
    o.put(1, ev.get("user_id"));
    o.put(2, ev.get("amount"));
    return o;
  }

  /** S2's dedup (BenchTopology.Dedup of peers/kstreams) on Avro records. */
  static final class Dedup implements Processor<String, GenericRecord, String, GenericRecord> {
    private final long windowMs;
    private ProcessorContext<String, GenericRecord> ctx;
    private KeyValueStore<String, Long> store;

    Dedup(long windowMs) {
      this.windowMs = windowMs;
    }

    @Override
    public void init(ProcessorContext<String, GenericRecord> context) {
      ctx = context;
      store = context.getStateStore(STORE);
      context.schedule(
          Duration.ofMillis(Math.max(1, windowMs / 8)),
          PunctuationType.STREAM_TIME,
          now -> {
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
    public void process(Record<String, GenericRecord> record) {
      GenericRecord ev = record.value();
      String id = ev.get("event_id").toString();
      long ts = (Long) ev.get("ts");
      Long t0 = store.get(id);
      if (t0 != null && ts < t0 + windowMs) {
        return;
      }
      store.put(id, ts);
      ctx.forward(record);
    }
  }
}
