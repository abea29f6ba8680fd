package dev.keystone.bench.flinkice;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import java.util.HashMap;
import java.util.Map;
import org.apache.flink.api.common.eventtime.WatermarkStrategy;
import org.apache.flink.api.common.functions.MapFunction;
import org.apache.flink.api.common.serialization.SimpleStringSchema;
import org.apache.flink.configuration.Configuration;
import org.apache.flink.connector.kafka.source.KafkaSource;
import org.apache.flink.connector.kafka.source.enumerator.initializer.OffsetsInitializer;
import org.apache.flink.streaming.api.CheckpointingMode;
import org.apache.flink.streaming.api.datastream.DataStream;
import org.apache.flink.streaming.api.environment.StreamExecutionEnvironment;
import org.apache.flink.table.data.GenericRowData;
import org.apache.flink.table.data.RowData;
import org.apache.flink.table.data.StringData;
import org.apache.flink.table.runtime.typeutils.InternalTypeInfo;
import org.apache.iceberg.DistributionMode;
import org.apache.iceberg.PartitionSpec;
import org.apache.iceberg.Schema;
import org.apache.iceberg.catalog.Catalog;
import org.apache.iceberg.catalog.Namespace;
import org.apache.iceberg.catalog.SupportsNamespaces;
import org.apache.iceberg.catalog.TableIdentifier;
import org.apache.iceberg.flink.CatalogLoader;
import org.apache.iceberg.flink.FlinkSchemaUtil;
import org.apache.iceberg.flink.TableLoader;
import org.apache.iceberg.flink.sink.FlinkSink;
import org.apache.iceberg.types.Types;

/**
 * S10's Flink peer: the events topic -> projection (amount, country, event_id, ts,
 * user_id) -> the Iceberg Flink sink (iceberg-flink-runtime-1.19 FlinkSink, the
 * exactly-once committer: data files are written between checkpoints and appended to
 * the table in one snapshot per completed checkpoint). The table is created here,
 * through the same REST catalog Keystone uses, with the columns and partition spec
 * Keystone's sink gives its table (identity(country)) and the Parquet codec Keystone
 * writes (zstd level 1). Checkpoints in EXACTLY_ONCE mode every --checkpoint-ms (the
 * Keystone pipeline's commitInterval). Runs until stopped: the harness stops it once
 * the table holds every row.
 */
public final class S10Job {
  private S10Job() {}

  static final ObjectMapper MAPPER = new ObjectMapper();

  /** Keystone's table: its contract's fields, required, in name order. */
  static final Schema SCHEMA =
      new Schema(
          Types.NestedField.required(1, "amount", Types.DoubleType.get()),
          Types.NestedField.required(2, "country", Types.StringType.get()),
          Types.NestedField.required(3, "event_id", Types.StringType.get()),
          Types.NestedField.required(4, "ts", Types.LongType.get()),
          Types.NestedField.required(5, "user_id", Types.StringType.get()));

  public static void main(String[] args) throws Exception {
    Map<String, String> opts = new HashMap<>();
    for (int i = 0; i + 1 < args.length; i += 2) {
      opts.put(args[i].replaceFirst("^--", ""), args[i + 1]);
    }
    int parallelism = Integer.parseInt(opts.getOrDefault("parallelism", "1"));

    Map<String, String> catalogProps = new HashMap<>();
    catalogProps.put("uri", opts.get("catalog-uri"));
    catalogProps.put("warehouse", opts.get("warehouse"));
    CatalogLoader catalogLoader =
        CatalogLoader.rest("bench", new org.apache.hadoop.conf.Configuration(), catalogProps);
    TableIdentifier id = TableIdentifier.of(Namespace.of(opts.get("namespace")), opts.get("table"));
    Catalog catalog = catalogLoader.loadCatalog();
    if (catalog instanceof SupportsNamespaces ns && !ns.namespaceExists(id.namespace())) {
      ns.createNamespace(id.namespace());
    }
    Map<String, String> tableProps = new HashMap<>();
    tableProps.put("write.parquet.compression-codec", "zstd");
    tableProps.put("write.parquet.compression-level", "1");
    catalog.createTable(
        id, SCHEMA, PartitionSpec.builderFor(SCHEMA).identity("country").build(), tableProps);

    Configuration conf = new Configuration();
    conf.setString("state.backend.type", "hashmap");
    conf.setString("pipeline.object-reuse", "true");
    conf.setString("rest.bind-port", "0");
    // A failure ends the run (and shows) instead of restarting silently.
    conf.setString("restart-strategy.type", "none");
    conf.setString("state.checkpoint-storage", "filesystem");
    conf.setString("state.checkpoints.dir", "file://" + opts.get("checkpoint-dir"));
    StreamExecutionEnvironment env = StreamExecutionEnvironment.createLocalEnvironment(parallelism, conf);
    env.getConfig().enableObjectReuse();
    env.setParallelism(parallelism);
    env.enableCheckpointing(
        Long.parseLong(opts.getOrDefault("checkpoint-ms", "1000")), CheckpointingMode.EXACTLY_ONCE);

    KafkaSource<String> source =
        KafkaSource.<String>builder()
            .setBootstrapServers(opts.get("bootstrap"))
            .setTopics(opts.get("in-topic"))
            .setGroupId(opts.get("group"))
            .setStartingOffsets(OffsetsInitializer.earliest())
            .setValueOnlyDeserializer(new SimpleStringSchema())
            .build();
    DataStream<RowData> rows =
        env.fromSource(source, WatermarkStrategy.noWatermarks(), "events")
            .map(new Project())
            .returns(InternalTypeInfo.of(FlinkSchemaUtil.convert(SCHEMA)))
            .name("project");
    FlinkSink.forRowData(rows)
        .tableLoader(TableLoader.fromCatalog(catalogLoader, id))
        .writeParallelism(parallelism)
        .distributionMode(DistributionMode.NONE)
        .append();
    env.execute("keystone-bench-s10");
  }

  /** The row: amount, country, event_id, ts, user_id of the event (each one required). */
  static final class Project implements MapFunction<String, RowData> {
    @Override
    public RowData map(String line) throws Exception {
      JsonNode ev = MAPPER.readTree(line);
      return GenericRowData.of(
          ev.get("amount").asDouble(),
          str(ev, "country"),
          str(ev, "event_id"),
          ev.get("ts").asLong(),
          str(ev, "user_id"));
    }

    private static StringData str(JsonNode ev, String field) {
      return StringData.fromString(ev.get(field).asText());
    }
  }
}
