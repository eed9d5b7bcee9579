-- The counts behind a visit's test accuracy: the confusion matrix of the hospital's held-out
-- beats, true classes as rows and predicted classes as columns, stored row-major in the order of
-- test_classes; and which kind of split made the test set ('patient': whole patients held out;
-- 'beat': beats drawn at random, so the same patients are on both sides). Set together, by the
-- visit's completion, whenever test_accuracy is; the coordinator checks that the counts sum to
-- test_samples.
alter table visits
    add column test_classes text[],
    add column test_confusion bigint[],
    add column test_evaluation text check (test_evaluation in ('patient', 'beat')),
    add constraint visits_test_confusion check (
        (test_classes is null and test_confusion is null and test_evaluation is null)
        or (test_classes is not null and test_confusion is not null and test_evaluation is not null
            and cardinality(test_classes) > 0
            and cardinality(test_confusion) = cardinality(test_classes) * cardinality(test_classes))
    );
