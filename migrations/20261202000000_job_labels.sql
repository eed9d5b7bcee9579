-- Job specs now name their label set, defaulting to AAMI. Every job stored before that trained
-- on the papers' classes (N L R A V): write that into their specs, so that they keep reading
-- as what they were. (A spec without preprocessing still means the papers' preset.)
update jobs set spec = spec || '{"labels": "papers"}'::jsonb where not spec ? 'labels';
