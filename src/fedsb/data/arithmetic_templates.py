"""The arithmetic generator's phrasings: ~20 templates per operation over many everyday themes.

Placeholders: {a}, {b}, {c} the numbers, always in the text in the order the operation takes them (so an
answer recomputes from the question's numbers read left to right); {N} and {M} two different names; {P} /
{p} the pronoun of {N} (He / he), {H} its object form (him), {R} its possessive (his); {o} a plural object
and {k} a plural container. Themes: counting objects, shopping and money, time, distance and length,
ages, sharing, cooking, sports, school, travel, farms and gardens, weights and temperatures. No template
holds a number (or a number word such as "one") of its own, and none holds a distractor number.
"""

from __future__ import annotations

__all__ = ["TEMPLATES"]

_ADD: tuple[str, ...] = (
    "{N} had {a} dollars and earned {b} dollars washing cars. How many dollars does {N} have now?",
    "A bus had {a} passengers. At the next stop {b} more got on and nobody got off. "
    "How many passengers are on the bus?",
    "{N} walked {a} kilometers in the morning and {b} kilometers in the evening. "
    "How far did {N} walk that day, in kilometers?",
    "{N} is {a} years old. How old will {p} be in {b} years?",
    "{N} practiced the piano for {a} minutes before lunch and {b} minutes after lunch. "
    "How many minutes did {N} practice in total?",
    "A farmer has {a} cows and buys {b} more. How many cows does the farmer have now?",
    "On Saturday {N} read {a} pages, and on Sunday {p} read {b} pages. "
    "What is the total number of pages {N} read over the weekend?",
    "{N} scored {a} points in the first half and {b} points in the second half. "
    "How many points did {N} score in the game?",
    "There are {a} girls and {b} boys in the choir. How many children are in the choir?",
    "A baker made {a} muffins in the morning and {b} muffins in the afternoon. "
    "How many muffins did the baker make?",
    "{N} paid {a} dollars for a book and {b} dollars for a pen. How much did {N} spend altogether?",
    "The train ride took {a} minutes and the walk from the station took {b} minutes. "
    "How long was the whole trip in minutes?",
    "If {N} has {a} {o} and {M} gives {H} {b} more, how many {o} will {N} have?",
    "In a parking lot there are {a} red cars and {b} blue cars. How many cars are there in the lot?",
    "{N} planted {a} tulips and {b} roses in the garden. How many flowers did {N} plant?",
    "A pile had {a} {o}, and {N} added {b} more. How many {o} are in the pile now?",
    "{N} saved {a} dollars last month and {b} dollars this month. How much has {N} saved so far?",
    "A library lent out {a} books on Monday and {b} books on Tuesday. "
    "How many books did it lend out on those days?",
    "{N} is {a} years old and {M} is {b} years older than {N}. How old is {M}?",
    "{N} ties a rope of {a} meters to a rope of {b} meters. How long is the joined rope in meters?",
    "There were {a} birds in a tree. Then {b} more birds landed on it. How many birds are in the tree now?",
    "What is the total of {N}'s {a} {o} and {M}'s {b} {o}?",
)

_SUB: tuple[str, ...] = (
    "{N} had {a} dollars and spent {b} dollars on lunch. How many dollars does {N} have left?",
    "A bus had {a} passengers. At the stop, {b} of them got off and nobody got on. "
    "How many passengers are still on the bus?",
    "{N} needs to run {a} kilometers. {P} has already run {b} kilometers. How many kilometers are left to run?",
    "A movie lasts {a} minutes. {N} has watched {b} minutes of it. How many minutes of the movie are left?",
    "{N} baked {a} cookies, and {R} friends ate {b} of them. How many cookies remain?",
    "A tree had {a} apples. The wind knocked {b} of them down. How many apples are still on the tree?",
    "{N} had {a} {o} but gave {b} of them to {M}. How many {o} does {N} keep?",
    "There are {a} seats in a small theater, and {b} of them are taken. How many seats are free?",
    "A book has {a} pages. {N} has read {b} pages so far. How many pages does {N} still have to read?",
    "{N} is {a} years old. How old was {p} {b} years ago?",
    "A jar held {a} candies until {N} ate {b}. How many candies are in the jar now?",
    "{N} gave the cashier {a} dollars for a toy that cost {b} dollars. How much change did {N} get back?",
    "Of the {a} students in a class, {b} are absent today. How many students are present?",
    "{N} blew up {a} balloons and {b} of them popped. How many balloons did not pop?",
    "A parking lot had {a} cars. Then {b} cars drove away. How many cars are left in the lot?",
    "The water tank holds {a} liters, and {b} liters have been used. How many liters are left in the tank?",
    "{N} wants to collect {a} {o} and already has {b}. How many more {o} does {N} need?",
    "There were {a} ducks on the pond. When {b} flew away, how many ducks were left?",
    "A shop had {a} {o} in stock and sold {b}. How many {o} are left in stock?",
    "{N} took {a} {o} to school and came home with {b} fewer. How many {o} did {N} bring home?",
    "From a ribbon {a} centimeters long, {N} cuts off {b} centimeters. How long is the ribbon now, in centimeters?",
)

_ADD_SUB: tuple[str, ...] = (
    "{N} had {a} dollars, earned {b} dollars and then spent {c} dollars. How many dollars does {N} have now?",
    "A bus left with {a} passengers. At the first stop {b} people got on and {c} got off. "
    "How many passengers are on the bus now?",
    "{N} had {a} {o}. {M} gave {H} {b} more, and then {N} lost {c}. How many {o} does {N} have?",
    "There were {a} birds on a wire. {b} more joined them, then {c} flew off. How many birds are on the wire now?",
    "A shop had {a} {o}. A delivery brought {b} more, and customers bought {c}. How many {o} does the shop have now?",
    "{N} had {a} stickers, bought {b} more at the fair and gave {c} to {M}. How many stickers does {N} have left?",
    "A library had {a} books on a shelf. The staff added {b} new books and readers borrowed {c}. "
    "How many books are on the shelf?",
    "{N} baked {a} cupcakes and {M} baked {b} cupcakes. At the party, {c} cupcakes were eaten. "
    "How many cupcakes are left?",
    "In a pond there were {a} fish. Then {b} baby fish hatched and {c} fish were caught. "
    "How many fish are in the pond now?",
    "{N} saved {a} dollars in May and {b} dollars in June, then spent {c} dollars on a game. "
    "How much money does {N} have left?",
    "A jar has {a} marbles. {N} puts in {b} marbles and then takes out {c}. How many marbles are in the jar?",
    "There were {a} people at the park. Then {b} more arrived and {c} went home. "
    "How many people are at the park now?",
    "{N} had {a} {o}. After getting {b} more and giving away {c}, how many {o} does {p} have?",
    "A train carried {a} people. At the station {b} people boarded and {c} people left. "
    "How many people are on the train?",
    "{N} picked {a} strawberries and {M} picked {b}. They ate {c} on the way home. "
    "How many strawberries did they bring home?",
    "Start with {a}, add {b} and take away {c}. What number do you get?",
    "A class had {a} pencils. The teacher brought {b} new ones and the students broke {c}. "
    "How many pencils are still unbroken?",
    "A farmer had {a} sheep, bought {b} more at the market and sold {c}. How many sheep does the farmer have?",
    "{N}'s phone had {a} photos. {P} took {b} more and deleted {c}. How many photos are on the phone?",
    "{N} had {a} coins in a piggy bank, put in {b} more and took out {c} to buy a snack. "
    "How many coins are in the piggy bank?",
)

_MUL: tuple[str, ...] = (
    "A pencil costs {a} dollars. How much do {b} pencils cost?",
    "{N} buys {a} packs of gum with {b} pieces in each pack. How many pieces of gum does {N} buy?",
    "A car travels {a} kilometers every hour. How far does it travel in {b} hours?",
    "{N} reads {a} pages a day. How many pages does {N} read in {b} days?",
    "There are {a} rows of chairs with {b} chairs in each row. How many chairs are there?",
    "Each ticket costs {a} dollars. {N} buys {b} tickets. What does {N} pay in total?",
    "{N} runs {a} laps every day for {b} days. How many laps does {N} run?",
    "A box holds {a} {o}. How many {o} are in {b} boxes?",
    "{N} saves {a} dollars each week. How much will {N} have saved after {b} weeks?",
    "A garden has {a} rows with {b} plants in each row. How many plants are in the garden?",
    "{N} has {a} friends and gives each of them {b} {o}. How many {o} does {N} give away?",
    "A tray holds {a} cupcakes. How many cupcakes fit on {b} trays?",
    "There are {a} teams with {b} players on each team. How many players are there altogether?",
    "{N} practices for {a} minutes each day. How many minutes does {N} practice in {b} days?",
    "A bag of flour weighs {a} kilograms. What do {b} bags weigh, in kilograms?",
    "{N} works {a} hours a day for {b} days. How many hours does {N} work?",
    "A bookshelf has {a} shelves and each shelf holds {b} books. How many books can the bookshelf hold?",
    "{a} children each bring {b} {o} to class. How many {o} do they bring in all?",
    "What is the cost of {a} notebooks at {b} dollars each?",
    "A bus makes {a} trips a day and carries {b} passengers on each trip. "
    "How many passengers does it carry in a day?",
    "{N} planted {a} rows of carrots, {b} carrots per row. How many carrots did {N} plant?",
)

_DIV: tuple[str, ...] = (
    "{a} {o} are shared equally by {b} children. How many {o} does each child get?",
    "{N} has {a} dollars to spend on toys that cost {b} dollars each. How many toys can {N} buy?",
    "A ribbon {a} meters long is cut into pieces of {b} meters each. How many pieces are there?",
    "{N} drove {a} kilometers in {b} hours at a steady speed. How many kilometers did {N} drive each hour?",
    "A book of {a} pages is read in {b} days, the same number of pages each day. "
    "How many pages are read per day?",
    "{a} students are split into {b} equal teams. How many students are on each team?",
    "{N} packs {a} eggs into cartons of {b}. How many cartons does {N} fill?",
    "A bill of {a} dollars is split evenly between {b} friends. How much does each friend pay?",
    "A farmer puts {a} apples into {b} baskets, the same number in each. How many apples are in each basket?",
    "{N} saved {a} dollars over {b} weeks, the same amount every week. How much did {N} save each week?",
    "There are {a} chairs arranged in {b} equal rows. How many chairs are in each row?",
    "{N} ran {a} laps in {b} days, the same number each day. How many laps did {N} run per day?",
    "A {a} minute show is divided into {b} equal parts. How many minutes long is each part?",
    "{a} cookies are put on plates, {b} cookies per plate. How many plates are needed?",
    "If {a} {o} are divided equally into {b} groups, how many {o} are in each group?",
    "A teacher has {a} stickers and gives the same number to each of {b} students, with none left over. "
    "How many stickers does each student get?",
    "To carry {a} books, {N} uses boxes that hold {b} books each. How many boxes does {N} need?",
    "A rope of {a} centimeters is cut into {b} equal pieces. How long is each piece, in centimeters?",
    "{N} earns {a} dollars for {b} hours of work. How much does {N} earn per hour?",
    "What is {a} divided by {b}?",
    "A pizza with {a} slices is shared equally among {b} people. How many slices does each person get?",
)

_DIFFERENCE: tuple[str, ...] = (
    "{N} is {a} years old and {M} is {b} years old. How much older is {N} than {M}?",
    "{N} has {a} dollars and {M} has {b} dollars. How much more money does {N} have?",
    "A red ribbon is {a} centimeters long and a blue ribbon is {b} centimeters long. "
    "How much longer is the red ribbon?",
    "{N} ran {a} kilometers and {M} ran {b} kilometers. How many kilometers farther did {N} run?",
    "The first movie is {a} minutes long and the second is {b} minutes long. "
    "How many minutes longer is the first movie?",
    "{N} scored {a} goals this season and {M} scored {b}. How many more goals did {N} score?",
    "The home team has {a} players and the visiting team has {b}. How many fewer players does the visiting team have?",
    "A cat weighs {a} kilograms and a puppy weighs {b} kilograms. How many kilograms heavier is the cat?",
    "{N} read {a} books this year and {M} read {b} books. "
    "What is the difference between the numbers of books they read?",
    "There are {a} boys and {b} girls in a club. How many more boys than girls are there?",
    "A jacket costs {a} dollars and a shirt costs {b} dollars. How much cheaper is the shirt?",
    "{N}'s tower is {a} blocks tall and {M}'s tower is {b} blocks tall. By how many blocks is {N}'s tower taller?",
    "On Monday it was {a} degrees and on Tuesday it was {b} degrees. How many degrees colder was Tuesday?",
    "{N} has {a} {o}. {M} has {b} {o}. How many {o} does {M} need to get to have as many as {N}?",
    "A school bus has {a} seats and a van has {b} seats. How many more seats does the bus have than the van?",
    "Compare {N}'s {a} {o} with {M}'s {b} {o}: how many more does {N} have?",
    "{N} slept {a} hours and {M} slept {b} hours. How many hours longer did {N} sleep?",
    "A tall tree is {a} meters high and a small tree is {b} meters high. "
    "What is the difference in their heights, in meters?",
    "{N} collected {a} shells at the beach, while {M} collected {b}. How many fewer shells did {M} collect?",
    "How much greater is {a} than {b}?",
    "A store sold {a} umbrellas on a rainy day and {b} umbrellas on a sunny day. "
    "How many more umbrellas were sold on the rainy day?",
)

#: operation -> its templates (the operation names are the generator's categories)
TEMPLATES: dict[str, tuple[str, ...]] = {
    "add": _ADD,
    "sub": _SUB,
    "add_sub": _ADD_SUB,
    "mul": _MUL,
    "div": _DIV,
    "difference": _DIFFERENCE,
}
