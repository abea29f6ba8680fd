package dev.keystone.bench.flink;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import com.fasterxml.jackson.databind.node.ObjectNode;
import java.io.BufferedReader;
import java.io.BufferedWriter;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Paths;
import java.time.Duration;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.Iterator;
import java.util.List;
import java.util.Map;
import java.util.TreeMap;
import java.util.concurrent.TimeUnit;
import org.apache.flink.api.common.JobExecutionResult;
import org.apache.flink.api.common.eventtime.WatermarkStrategy;
import org.apache.flink.api.common.functions.OpenContext;
import org.apache.flink.api.common.functions.RichFlatMapFunction;
import org.apache.flink.api.common.state.MapState;
import org.apache.flink.api.common.state.MapStateDescriptor;
import org.apache.flink.api.common.state.ValueState;
import org.apache.flink.api.common.state.ValueStateDescriptor;
import org.apache.flink.api.common.serialization.SimpleStringSchema;
import org.apache.flink.api.common.typeinfo.Types;
import org.apache.flink.api.connector.sink2.Sink;
import org.apache.flink.api.connector.sink2.SinkWriter;
import org.apache.flink.api.connector.sink2.WriterInitContext;
import org.apache.flink.api.java.tuple.Tuple3;
import org.apache.flink.configuration.Configuration;
import org.apache.flink.connector.base.DeliveryGuarantee;
import org.apache.flink.connector.kafka.sink.KafkaRecordSerializationSchema;
import org.apache.flink.connector.kafka.sink.KafkaSink;
import org.apache.flink.connector.kafka.source.KafkaSource;
import org.apache.flink.connector.kafka.source.enumerator.initializer.OffsetsInitializer;
import org.apache.flink.core.execution.CheckpointingMode;
import org.apache.flink.connector.file.src.FileSource;
import org.apache.flink.connector.file.src.reader.TextLineInputFormat;
import org.apache.flink.core.fs.Path;
import org.apache.flink.streaming.api.datastream.DataStream;
import org.apache.flink.streaming.api.environment.StreamExecutionEnvironment;
import org.apache.flink.streaming.api.functions.KeyedProcessFunction;
import org.apache.flink.util.Collector;

/**
 * The Flink peer of the Keystone benchmarks: one DataStream job per scenario on a
 * local MiniCluster, reading the generator's JSON lines from a file and writing JSON
 * lines. Semantics are those documented in e2e/bench/README.md; the runner checks the
 * output digest against the reference.
 *
 * <p>Prints {@code KSBENCH_JOB_MS <ms>} (the job's net runtime, without JVM and
 * MiniCluster start) on stdout.
 */
public final class BenchJob {
  private BenchJob() {}

  static final ObjectMapper MAPPER = new ObjectMapper();

  public static void main(String[] args) throws Exception {
    Map<String, String> opts = new HashMap<>();
    for (int i = 0; i + 1 < args.length; i += 2) {
      opts.put(args[i].replaceFirst("^--", ""), args[i + 1]);
    }
    String scenario = opts.get("scenario");
    String input = opts.get("input");
    String output = opts.get("output");
    String backend = opts.getOrDefault("backend", "heap");
    int parallelism = Integer.parseInt(opts.getOrDefault("parallelism", "1"));
    long windowMs = Long.parseLong(opts.getOrDefault("window-ms", "600000"));
    long maxDelayMs = Long.parseLong(opts.getOrDefault("max-delay-ms", "2000"));

    Configuration conf = new Configuration();
    conf.setString("state.backend.type", backend.equals("rocksdb") ? "rocksdb" : "hashmap");
    conf.setString("pipeline.object-reuse", "true");
    conf.setString("rest.bind-port", "0");
    if (opts.containsKey("checkpoint-dir")) {
      conf.setString("execution.checkpointing.storage", "filesystem");
      conf.setString("execution.checkpointing.dir", "file://" + opts.get("checkpoint-dir"));
    }
    if (opts.containsKey("managed-memory")) {
      conf.setString("taskmanager.memory.managed.size", opts.get("managed-memory"));
    }
    StreamExecutionEnvironment env = StreamExecutionEnvironment.createLocalEnvironment(parallelism, conf);
    env.getConfig().enableObjectReuse();
    env.setParallelism(parallelism);

    if (scenario.equals("s5") || scenario.equals("s6")) {
      runKafka(env, opts, scenario, windowMs);
      return;
    }

    FileSource<String> source =
        FileSource.forRecordStreamFormat(new TextLineInputFormat(), new Path(input)).build();

    DataStream<String> out;
    switch (scenario) {
      case "s1": {
        DataStream<String> lines = env.fromSource(source, WatermarkStrategy.noWatermarks(), "events");
        out = lines.flatMap(new FilterProject()).name("filter-project");
        break;
      }
      case "s2": {
        // Event time from `ts`; the watermark trails the highest ts seen (duplicates
        // carry their original ts and arrive late, which a KeyedProcessFunction accepts).
        WatermarkStrategy<String> wm =
            WatermarkStrategy.<String>forBoundedOutOfOrderness(Duration.ZERO)
                .withTimestampAssigner((line, prev) -> TsExtract.ts(line));
        DataStream<String> lines = env.fromSource(source, wm, "events");
        out = lines.flatMap(new KeyTsExtract("event_id", "ts")).name("parse")
            .keyBy(t -> t.f0, Types.STRING)
            .process(new Dedup(windowMs)).name("dedup");
        break;
      }
      case "s3": {
        DataStream<String> lines = env.fromSource(source, WatermarkStrategy.noWatermarks(), "cdc");
        out = lines.flatMap(new KeyTsExtract("order_id", "seq")).name("parse")
            .keyBy(t -> t.f0, Types.STRING)
            .process(new Reorder(maxDelayMs, true)).name("order");
        break;
      }
      case "s3b": {
        // Every event waits (no contiguous run); the delay outlasts the run.
        long waitMs = Long.parseLong(opts.getOrDefault("max-delay-ms", "600000"));
        DataStream<String> lines = env.fromSource(source, WatermarkStrategy.noWatermarks(), "cdc");
        out = lines.flatMap(new KeyTsExtract("order_id", "seq")).name("parse")
            .keyBy(t -> t.f0, Types.STRING)
            .process(new Reorder(waitMs, false)).name("order");
        break;
      }
      case "s4": {
        DataStream<String> lines = env.fromSource(source, WatermarkStrategy.noWatermarks(), "events");
        out = lines.flatMap(new Enrich(opts.get("table"))).name("join");
        break;
      }
      default:
        throw new IllegalArgumentException("unknown scenario " + scenario);
    }
    out.sinkTo(new LinesSink(output)).name("out");
    JobExecutionResult result = env.execute("keystone-bench-" + scenario + "-" + backend);
    System.out.println("KSBENCH_JOB_MS " + result.getNetRuntime(TimeUnit.MILLISECONDS));
  }

  /**
   * S5 (at-least-once) and S6 (exactly-once): Kafka source (the events topic, from the
   * earliest offset, a new group), S2's dedup, S1's projection, Kafka sink. Checkpoints
   * every 1 s (the sink flushes, and under exactly-once commits its transaction, on
   * each), state on the heap with file checkpoint storage. Runs until stopped: the
   * harness stops it once the output holds every expected record.
   */
  static void runKafka(
      StreamExecutionEnvironment env, Map<String, String> opts, String scenario, long windowMs)
      throws Exception {
    boolean exactlyOnce = scenario.equals("s6");
    String bootstrap = opts.get("bootstrap");
    env.enableCheckpointing(
        Long.parseLong(opts.getOrDefault("checkpoint-ms", "1000")),
        exactlyOnce ? CheckpointingMode.EXACTLY_ONCE : CheckpointingMode.AT_LEAST_ONCE);
    KafkaSource<String> source =
        KafkaSource.<String>builder()
            .setBootstrapServers(bootstrap)
            .setTopics(opts.get("in-topic"))
            .setGroupId(opts.get("group"))
            .setStartingOffsets(OffsetsInitializer.earliest())
            .setValueOnlyDeserializer(new SimpleStringSchema())
            .build();
    WatermarkStrategy<String> wm =
        WatermarkStrategy.<String>forBoundedOutOfOrderness(Duration.ZERO)
            .withTimestampAssigner((line, prev) -> TsExtract.ts(line));
    KafkaSink<String> sink =
        KafkaSink.<String>builder()
            .setBootstrapServers(bootstrap)
            .setRecordSerializer(
                KafkaRecordSerializationSchema.builder()
                    .setTopic(opts.get("out-topic"))
                    .setValueSerializationSchema(new SimpleStringSchema())
                    .build())
            .setDeliveryGuarantee(
                exactlyOnce ? DeliveryGuarantee.EXACTLY_ONCE : DeliveryGuarantee.AT_LEAST_ONCE)
            .setTransactionalIdPrefix(opts.get("group"))
            .setProperty("transaction.timeout.ms", "60000")
            .build();
    env.fromSource(source, wm, "events")
        .flatMap(new KeyTsExtract("event_id", "ts")).name("parse")
        .keyBy(t -> t.f0, Types.STRING)
        .process(new Dedup(windowMs)).name("dedup")
        .flatMap(new Project()).name("project")
        .sinkTo(sink).name("out");
    env.execute("keystone-bench-" + scenario);
  }

  /** Projects event_id, user_id, amount of an event (JSON text). */
  static final class Project extends RichFlatMapFunction<String, String> {
    @Override
    public void flatMap(String line, Collector<String> out) throws Exception {
      JsonNode ev = MAPPER.readTree(line);
      ObjectNode o = MAPPER.createObjectNode();
      o.set("event_id", ev.get("event_id"));
      o.set("user_id", ev.get("user_id"));
      o.set("amount", ev.get("amount"));
      out.collect(MAPPER.writeValueAsString(o));
    }
  }

  /** Reads `ts` (epoch ms) for the watermark assigner without building a tree. */
  static final class TsExtract {
    static long ts(String line) {
      int at = line.indexOf("\"ts\":");
      if (at < 0) {
        return Long.MIN_VALUE;
      }
      int i = at + 5;
      long v = 0;
      while (i < line.length() && Character.isDigit(line.charAt(i))) {
        v = v * 10 + (line.charAt(i) - '0');
        i++;
      }
      return v;
    }
  }

  /** S1: keep `!bot && action in [view, purchase]`, project event_id, user_id, amount. */
  static final class FilterProject extends RichFlatMapFunction<String, String> {
    @Override
    public void flatMap(String line, Collector<String> out) throws Exception {
      JsonNode ev = MAPPER.readTree(line);
      String action = ev.path("action").asText();
      if (ev.path("bot").asBoolean() || !(action.equals("view") || action.equals("purchase"))) {
        return;
      }
      ObjectNode o = MAPPER.createObjectNode();
      o.set("event_id", ev.get("event_id"));
      o.set("user_id", ev.get("user_id"));
      o.set("amount", ev.get("amount"));
      out.collect(MAPPER.writeValueAsString(o));
    }
  }

  /** Parses the event and extracts (key, long field, original line). */
  static final class KeyTsExtract extends RichFlatMapFunction<String, Tuple3<String, Long, String>> {
    private final String keyField;
    private final String longField;
    private transient Tuple3<String, Long, String> reuse;

    KeyTsExtract(String keyField, String longField) {
      this.keyField = keyField;
      this.longField = longField;
    }

    @Override
    public void open(OpenContext ctx) {
      reuse = new Tuple3<>();
    }

    @Override
    public void flatMap(String line, Collector<Tuple3<String, Long, String>> out) throws Exception {
      JsonNode ev = MAPPER.readTree(line);
      reuse.f0 = ev.get(keyField).asText();
      reuse.f1 = ev.get(longField).asLong();
      reuse.f2 = line;
      out.collect(reuse);
    }
  }

  /**
   * S2: the first event per id passes; an event with ts < t0 + window is dropped; the
   * key is forgotten when the watermark passes t0 + window (event-time timer).
   */
  static final class Dedup extends KeyedProcessFunction<String, Tuple3<String, Long, String>, String> {
    private final long windowMs;
    private transient ValueState<Long> firstSeen;

    Dedup(long windowMs) {
      this.windowMs = windowMs;
    }

    @Override
    public void open(OpenContext ctx) {
      firstSeen = getRuntimeContext().getState(new ValueStateDescriptor<>("first-seen", Types.LONG));
    }

    @Override
    public void processElement(Tuple3<String, Long, String> ev, Context ctx, Collector<String> out)
        throws Exception {
      Long t0 = firstSeen.value();
      long ts = ev.f1;
      if (t0 != null && ts < t0 + windowMs) {
        return;
      }
      firstSeen.update(ts);
      ctx.timerService().registerEventTimeTimer(ts + windowMs);
      out.collect(ev.f2);
    }

    @Override
    public void onTimer(long timestamp, OnTimerContext ctx, Collector<String> out) throws Exception {
      Long t0 = firstSeen.value();
      if (t0 != null && t0 + windowMs <= timestamp) {
        firstSeen.clear();
      }
    }
  }

  /**
   * S3: per key, ascending by seq, contiguous: seq == last + 1 (or 1 for a key with no
   * history: contiguous sequences start at 1, as in Keystone) leaves at once with the
   * run that follows (S3b, not contiguous: nothing leaves at once); anything else waits until max-delay of processing time after it
   * arrived, then leaves with every lower waiting seq. Stale (<= last or already
   * waiting) is dropped. End of input (the final watermark) flushes every key.
   */
  static final class Reorder extends KeyedProcessFunction<String, Tuple3<String, Long, String>, String> {
    private static final long FLUSH_AT_END = Long.MAX_VALUE - 1;
    private final long maxDelayMs;
    private final boolean contiguous;
    private transient ValueState<Long> last;
    /** seq -> arrival ms + "\n" + line. */
    private transient MapState<Long, String> pending;

    Reorder(long maxDelayMs, boolean contiguous) {
      this.maxDelayMs = maxDelayMs;
      this.contiguous = contiguous;
    }

    @Override
    public void open(OpenContext ctx) {
      last = getRuntimeContext().getState(new ValueStateDescriptor<>("last", Types.LONG));
      pending = getRuntimeContext().getMapState(new MapStateDescriptor<>("pending", Types.LONG, Types.STRING));
    }

    @Override
    public void processElement(Tuple3<String, Long, String> ev, Context ctx, Collector<String> out)
        throws Exception {
      long seq = ev.f1;
      Long lastSeq = last.value();
      if (lastSeq != null && seq <= lastSeq) {
        return;
      }
      if (pending.contains(seq)) {
        return;
      }
      if (contiguous && seq == (lastSeq == null ? 1 : lastSeq + 1)) {
        out.collect(ev.f2);
        last.update(seq);
        releaseRun(seq, out);
        return;
      }
      long now = ctx.timerService().currentProcessingTime();
      pending.put(seq, now + "\n" + ev.f2);
      ctx.timerService().registerProcessingTimeTimer(now + maxDelayMs);
      ctx.timerService().registerEventTimeTimer(FLUSH_AT_END);
    }

    private void releaseRun(long from, Collector<String> out) throws Exception {
      long next = from + 1;
      String p;
      while ((p = pending.get(next)) != null) {
        out.collect(p.substring(p.indexOf('\n') + 1));
        pending.remove(next);
        last.update(next);
        next++;
      }
    }

    @Override
    public void onTimer(long timestamp, OnTimerContext ctx, Collector<String> out) throws Exception {
      TreeMap<Long, String> waiting = new TreeMap<>();
      for (Map.Entry<Long, String> e : pending.entries()) {
        waiting.put(e.getKey(), e.getValue());
      }
      if (waiting.isEmpty()) {
        return;
      }
      long upto;
      if (timestamp == FLUSH_AT_END) {
        upto = Long.MAX_VALUE;
      } else {
        // The highest seq whose deadline (arrival + max delay) has passed.
        upto = Long.MIN_VALUE;
        for (Map.Entry<Long, String> e : waiting.entrySet()) {
          String v = e.getValue();
          long arrived = Long.parseLong(v.substring(0, v.indexOf('\n')));
          if (arrived + maxDelayMs <= timestamp) {
            upto = Math.max(upto, e.getKey());
          }
        }
        if (upto == Long.MIN_VALUE) {
          return;
        }
      }
      long lastOut = Long.MIN_VALUE;
      Iterator<Map.Entry<Long, String>> it = waiting.entrySet().iterator();
      while (it.hasNext()) {
        Map.Entry<Long, String> e = it.next();
        if (e.getKey() > upto) {
          break;
        }
        String v = e.getValue();
        out.collect(v.substring(v.indexOf('\n') + 1));
        pending.remove(e.getKey());
        lastOut = e.getKey();
      }
      last.update(lastOut);
      if (contiguous) {
        releaseRun(lastOut, out);
      }
    }
  }

  /** S4: inner join on customer_id with the table (loaded in open()), fields name, tier under `customer`. */
  static final class Enrich extends RichFlatMapFunction<String, String> {
    private final String tablePath;
    private transient Map<String, ObjectNode> table;

    Enrich(String tablePath) {
      this.tablePath = tablePath;
    }

    @Override
    public void open(OpenContext ctx) throws IOException {
      table = new HashMap<>();
      try (BufferedReader r = Files.newBufferedReader(Paths.get(tablePath), StandardCharsets.UTF_8)) {
        String line;
        while ((line = r.readLine()) != null) {
          JsonNode row = MAPPER.readTree(line);
          ObjectNode c = MAPPER.createObjectNode();
          c.set("name", row.get("name"));
          c.set("tier", row.get("tier"));
          table.put(row.get("id").asText(), c);
        }
      }
    }

    @Override
    public void flatMap(String line, Collector<String> out) throws Exception {
      ObjectNode ev = (ObjectNode) MAPPER.readTree(line);
      JsonNode id = ev.get("customer_id");
      ObjectNode row = id == null ? null : table.get(id.asText());
      if (row == null) {
        return;
      }
      ev.set("customer", row);
      out.collect(MAPPER.writeValueAsString(ev));
    }
  }

  /** Writes JSON lines to OUTPUT (parallelism 1) or OUTPUT.N per subtask. */
  static final class LinesSink implements Sink<String> {
    private final String path;

    LinesSink(String path) {
      this.path = path;
    }

    @Override
    public SinkWriter<String> createWriter(WriterInitContext ctx) throws IOException {
      int n = ctx.getTaskInfo().getNumberOfParallelSubtasks();
      int i = ctx.getTaskInfo().getIndexOfThisSubtask();
      String file = n == 1 ? path : path + "." + i;
      BufferedWriter w = Files.newBufferedWriter(Paths.get(file), StandardCharsets.UTF_8);
      return new SinkWriter<>() {
        @Override
        public void write(String line, Context c) throws IOException {
          w.write(line);
          w.write('\n');
        }

        @Override
        public void flush(boolean endOfInput) throws IOException {
          w.flush();
        }

        @Override
        public void close() throws IOException {
          w.close();
        }
      };
    }
  }
}
