//! Checks on the plan's topic names: none may be the source topic under
//! another role, and none may exceed Kafka's length limit.

use super::{Checker, ErrorKind};
use crate::plan::{PlanTopic, TopicRole};

impl Checker<'_> {
    pub(super) fn check_topic_names(&mut self, topics: &[PlanTopic]) {
        let source = &self.pipeline.spec.source.topic;
        for topic in topics {
            if topic.role != TopicRole::Source
                && topic.role != TopicRole::Sink
                && topic.role != TopicRole::Table
                && &topic.name == source
            {
                self.error(
                    ErrorKind::TopicCycle,
                    "spec.deadLetter.topic",
                    None,
                    format!(
                        "topic {:?} is the pipeline's source and cannot also be its {} topic",
                        topic.name,
                        topic.role.as_str()
                    ),
                );
            }
            if topic.name.len() > 249 {
                self.error(
                    ErrorKind::InvalidOperator,
                    "metadata.name",
                    None,
                    format!("the internal topic name {:?} is longer than Kafka's limit of 249 characters; shorten the pipeline or step name", topic.name),
                );
            }
        }
    }
}
